"""Codec payload inspection on the ingest side: keyframe starts, VP8/VP9 descriptors, sizes.

The fan-out needs to know where a viewer may start (or switch simulcast layers)
cleanly: at the first RTP packet of a keyframe. That is read from the RTP payload
format of each codec, never from the codec bitstream beyond its first bytes:

- VP8  (RFC 7741 §4.2, §4.3): S bit set, partition 0, and the P bit of the frame header clear.
- VP9  (RFC 9628 §4.2): B (start of frame) set, P (inter-picture predicted) clear, layer 0.
- H264 (RFC 6184 §5.6-§5.8): an SPS or PPS, or the first slice of an IDR picture, alone,
  inside a STAP-A, or at the start (S bit) of an FU-A.
- AV1  (AV1 RTP spec §4.4): the N bit of the aggregation header (new coded video sequence).
- Audio: every packet decodes alone, so none is a "keyframe start".

Payloads too short to carry what the format promises are simply not keyframe starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from whepfan.errors import ParseError


@dataclass(slots=True, kw_only=True)
class Vp8PayloadDescriptor:
    """The VP8 RTP payload descriptor (RFC 7741 §4.2)::

             0 1 2 3 4 5 6 7
            +-+-+-+-+-+-+-+-+
            |X|R|N|S|R| PID | (REQUIRED)
            +-+-+-+-+-+-+-+-+
       X:   |I|L|T|K| RSV   | (OPTIONAL)
            +-+-+-+-+-+-+-+-+
       I:   |M| PictureID   | (OPTIONAL; M set: 15-bit picture id over two bytes)
            +-+-+-+-+-+-+-+-+
       L:   |   TL0PICIDX   | (OPTIONAL)
            +-+-+-+-+-+-+-+-+
       T/K: |TID|Y| KEYIDX  | (OPTIONAL)
            +-+-+-+-+-+-+-+-+

    A simulcast switch rewrites ``picture_id`` and ``tl0_pic_idx`` so the viewer sees
    one continuous sequence: ``split`` the payload, ``dataclasses.replace`` the fields,
    and prepend ``bytes(descriptor)`` to the rest again.
    """

    non_reference: bool = False
    start_of_partition: bool = False
    partition_index: int = 0
    picture_id: int | None = None
    # M bit: the picture id takes 15 bits (two bytes) rather than 7.
    long_picture_id: bool = True
    tl0_pic_idx: int | None = None
    temporal_layer: int | None = None
    layer_sync: bool = False
    key_index: int | None = None

    @classmethod
    def parse(cls, payload: bytes | bytearray | memoryview) -> Vp8PayloadDescriptor:
        return cls.split(payload)[0]

    @classmethod
    def split(cls, payload: bytes | bytearray | memoryview) -> tuple[Vp8PayloadDescriptor, bytes]:
        """The descriptor and the VP8 data following it."""
        size = len(payload)
        if size < 1:
            raise ParseError("empty VP8 payload")
        first = payload[0]
        descriptor = cls(
            non_reference=bool(first & 0x20),
            start_of_partition=bool(first & 0x10),
            partition_index=first & 0x07,
        )
        offset = 1
        if first & 0x80:
            if size < 2:
                raise ParseError("VP8 descriptor truncated in its extension byte")
            extension = payload[1]
            offset = 2
            if extension & 0x80:
                if offset >= size:
                    raise ParseError("VP8 descriptor truncated in its picture id")
                picture_byte = payload[offset]
                if picture_byte & 0x80:
                    if offset + 2 > size:
                        raise ParseError("VP8 descriptor truncated in its 15-bit picture id")
                    descriptor.picture_id = (picture_byte & 0x7F) << 8 | payload[offset + 1]
                    offset += 2
                else:
                    descriptor.picture_id = picture_byte
                    descriptor.long_picture_id = False
                    offset += 1
            if extension & 0x40:
                if offset >= size:
                    raise ParseError("VP8 descriptor truncated in its TL0PICIDX")
                descriptor.tl0_pic_idx = payload[offset]
                offset += 1
            if extension & 0x30:
                if offset >= size:
                    raise ParseError("VP8 descriptor truncated in its TID/KEYIDX byte")
                layer_byte = payload[offset]
                offset += 1
                if extension & 0x20:
                    descriptor.temporal_layer = layer_byte >> 6
                descriptor.layer_sync = bool(layer_byte & 0x20)
                if extension & 0x10:
                    descriptor.key_index = layer_byte & 0x1F
        return descriptor, bytes(payload[offset:])

    def serialize(self) -> bytes:
        extension = (
            (0x80 if self.picture_id is not None else 0)
            | (0x40 if self.tl0_pic_idx is not None else 0)
            | (0x20 if self.temporal_layer is not None else 0)
            | (0x10 if self.key_index is not None else 0)
        )
        if not 0 <= self.partition_index <= 7:
            raise ValueError("VP8 partition index is 3 bits")
        first = (
            (0x80 if extension else 0)
            | (0x20 if self.non_reference else 0)
            | (0x10 if self.start_of_partition else 0)
            | self.partition_index
        )
        encoded = bytearray((first,))
        if extension:
            encoded.append(extension)
        if self.picture_id is not None:
            if self.long_picture_id:
                if not 0 <= self.picture_id <= 0x7FFF:
                    raise ValueError("a 15-bit VP8 picture id is 0..32767")
                encoded += bytes((0x80 | self.picture_id >> 8, self.picture_id & 0xFF))
            else:
                if not 0 <= self.picture_id <= 0x7F:
                    raise ValueError("a 7-bit VP8 picture id is 0..127")
                encoded.append(self.picture_id)
        if self.tl0_pic_idx is not None:
            encoded.append(self.tl0_pic_idx)
        if self.temporal_layer is not None or self.key_index is not None:
            encoded.append(
                ((self.temporal_layer or 0) & 0x03) << 6
                | (0x20 if self.layer_sync else 0)
                | ((self.key_index or 0) & 0x1F)
            )
        return bytes(encoded)

    __bytes__ = serialize


def _vp8_is_keyframe_start(payload: bytes) -> bool:
    try:
        descriptor, frame = Vp8PayloadDescriptor.split(payload)
    except ParseError:
        return False
    # RFC 7741 §4.3: the payload header opens partition 0 only; its P bit is 0 on keyframes.
    return (
        descriptor.start_of_partition
        and descriptor.partition_index == 0
        and len(frame) > 0
        and not frame[0] & 0x01
    )


def vp8_keyframe_size(payload: bytes) -> tuple[int, int] | None:
    """(width, height) of the keyframe this RTP payload starts, or None if it starts none.

    RFC 6386 §9.1: after the 3-byte frame tag a keyframe carries the start code
    9d 01 2a, then 16-bit little-endian width and height whose top 2 bits are scaling.
    """
    if not _vp8_is_keyframe_start(payload):
        return None
    frame = Vp8PayloadDescriptor.split(payload)[1]
    if len(frame) < 10:
        raise ParseError("VP8 keyframe header truncated")
    if frame[3:6] != b"\x9d\x01\x2a":
        raise ParseError("VP8 keyframe lacks its start code")
    width = int.from_bytes(frame[6:8], "little") & 0x3FFF
    height = int.from_bytes(frame[8:10], "little") & 0x3FFF
    return width, height


@dataclass(frozen=True, slots=True, kw_only=True)
class Vp9GroupPicture:
    """One picture of a VP9 group of frames (RFC 9628 §4.2.1, the N_G loop of the SS):
    its temporal layer, U bit, and references as picture-id distances (0 to 3)."""

    temporal_layer: int
    switching_up: bool = False
    reference_diffs: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Vp9ScalabilityStructure:
    """The VP9 scalability structure (RFC 9628 §4.2.1)::

             +-+-+-+-+-+-+-+-+
        V:   | N_S |Y|G|-|-|-|
             +-+-+-+-+-+-+-+-+              -+
        Y:   |     WIDTH     | (16 bits)     .
             |     HEIGHT    | (16 bits)     . N_S + 1 times
             +-+-+-+-+-+-+-+-+              -+
        G:   |      N_G      |
             +-+-+-+-+-+-+-+-+                           -+
        N_G: |  T  |U| R |-|-|                            .
             +-+-+-+-+-+-+-+-+              -+            . N_G times
             |    P_DIFF     | (R times)     .            .
             +-+-+-+-+-+-+-+-+              -+           -+

    In non-flexible mode a receiver maps each picture to ``pictures[(picture id -
    first picture id of the group) % N_G]`` to learn its references.
    """

    spatial_layers: int = 1
    resolutions: tuple[tuple[int, int], ...] | None = None  # (width, height) per layer
    pictures: tuple[Vp9GroupPicture, ...] | None = None

    @classmethod
    def parse_from(
        cls, data: bytes | bytearray | memoryview, offset: int
    ) -> tuple[Vp9ScalabilityStructure, int]:
        """The structure starting at ``offset`` and the offset after it."""
        size = len(data)
        if offset >= size:
            raise ParseError("VP9 scalability structure missing")
        first = data[offset]
        offset += 1
        spatial_layers = (first >> 5) + 1
        resolutions = None
        if first & 0x10:
            if offset + 4 * spatial_layers > size:
                raise ParseError("VP9 scalability structure truncated in its resolutions")
            resolutions = tuple(
                (
                    int.from_bytes(data[offset + 4 * i : offset + 4 * i + 2], "big"),
                    int.from_bytes(data[offset + 4 * i + 2 : offset + 4 * i + 4], "big"),
                )
                for i in range(spatial_layers)
            )
            offset += 4 * spatial_layers
        pictures = None
        if first & 0x08:
            if offset >= size:
                raise ParseError("VP9 scalability structure truncated in N_G")
            count = data[offset]
            offset += 1
            group = []
            for _ in range(count):
                if offset >= size:
                    raise ParseError("VP9 scalability structure truncated in its group")
                octet = data[offset]
                references = octet >> 2 & 0x03
                if offset + 1 + references > size:
                    raise ParseError("VP9 scalability structure truncated in a P_DIFF")
                group.append(
                    Vp9GroupPicture(
                        temporal_layer=octet >> 5,
                        switching_up=bool(octet & 0x10),
                        reference_diffs=tuple(data[offset + 1 : offset + 1 + references]),
                    )
                )
                offset += 1 + references
            pictures = tuple(group)
        structure = cls(spatial_layers=spatial_layers, resolutions=resolutions, pictures=pictures)
        return structure, offset

    def serialize(self) -> bytes:
        if not 1 <= self.spatial_layers <= 8:
            raise ValueError("a VP9 scalability structure has 1..8 spatial layers (N_S + 1)")
        encoded = bytearray(
            (
                (self.spatial_layers - 1) << 5
                | (0x10 if self.resolutions is not None else 0)
                | (0x08 if self.pictures is not None else 0),
            )
        )
        if self.resolutions is not None:
            if len(self.resolutions) != self.spatial_layers:
                raise ValueError("one VP9 resolution per spatial layer")
            for width, height in self.resolutions:
                encoded += width.to_bytes(2, "big") + height.to_bytes(2, "big")
        if self.pictures is not None:
            if len(self.pictures) > 255:
                raise ValueError("a VP9 group of frames has at most 255 pictures (N_G)")
            encoded.append(len(self.pictures))
            for picture in self.pictures:
                if not 0 <= picture.temporal_layer <= 7 or len(picture.reference_diffs) > 3:
                    raise ValueError("VP9 group picture: TID 0..7, at most 3 references")
                encoded.append(
                    picture.temporal_layer << 5
                    | (0x10 if picture.switching_up else 0)
                    | len(picture.reference_diffs) << 2
                )
                encoded += bytes(picture.reference_diffs)
        return bytes(encoded)

    __bytes__ = serialize


@dataclass(slots=True, kw_only=True)
class Vp9PayloadDescriptor:
    """The VP9 RTP payload descriptor (RFC 9628 §4.2)::

             0 1 2 3 4 5 6 7
            +-+-+-+-+-+-+-+-+
            |I|P|L|F|B|E|V|Z| (REQUIRED)
            +-+-+-+-+-+-+-+-+
       I:   |M| PICTURE ID  | (M set: 15-bit picture id over two bytes)
            +-+-+-+-+-+-+-+-+
       M:   | EXTENDED PID  |
            +-+-+-+-+-+-+-+-+
       L:   | TID |U| SID |D|
            +-+-+-+-+-+-+-+-+
            |   TL0PICIDX   | (L set, non-flexible mode)
            +-+-+-+-+-+-+-+-+
       P,F: | P_DIFF      |N| (flexible mode, P set: 1 to 3 times)
            +-+-+-+-+-+-+-+-+
       V:   | SS ...        | (Vp9ScalabilityStructure)
            +-+-+-+-+-+-+-+-+

    Layer indices are present when ``temporal_layer`` is not None; in non-flexible mode
    they always carry ``tl0_pic_idx``.
    """

    picture_id: int | None = None
    # M bit: the picture id takes 15 bits (two bytes) rather than 7.
    long_picture_id: bool = True
    inter_picture_predicted: bool = False  # P
    flexible: bool = False  # F
    start_of_frame: bool = False  # B
    end_of_frame: bool = False  # E
    not_upper_layer_reference: bool = False  # Z
    temporal_layer: int | None = None  # TID; None: no layer indices (L clear)
    switching_up: bool = False  # U
    spatial_layer: int = 0  # SID
    inter_layer_dependency: bool = False  # D
    tl0_pic_idx: int | None = None
    reference_diffs: tuple[int, ...] = ()  # P_DIFF, flexible mode with P set
    scalability_structure: Vp9ScalabilityStructure | None = None

    @classmethod
    def parse(cls, payload: bytes | bytearray | memoryview) -> Vp9PayloadDescriptor:
        return cls.split(payload)[0]

    @classmethod
    def split(cls, payload: bytes | bytearray | memoryview) -> tuple[Vp9PayloadDescriptor, bytes]:
        """The descriptor and the VP9 data following it."""
        size = len(payload)
        if size < 1:
            raise ParseError("empty VP9 payload")
        first = payload[0]
        descriptor = cls(
            inter_picture_predicted=bool(first & 0x40),
            flexible=bool(first & 0x10),
            start_of_frame=bool(first & 0x08),
            end_of_frame=bool(first & 0x04),
            not_upper_layer_reference=bool(first & 0x01),
        )
        offset = 1
        if first & 0x80:
            if offset >= size:
                raise ParseError("VP9 descriptor truncated in its picture id")
            if payload[offset] & 0x80:
                if offset + 2 > size:
                    raise ParseError("VP9 descriptor truncated in its 15-bit picture id")
                descriptor.picture_id = (payload[offset] & 0x7F) << 8 | payload[offset + 1]
                offset += 2
            else:
                descriptor.picture_id = payload[offset]
                descriptor.long_picture_id = False
                offset += 1
        if first & 0x20:
            if offset >= size:
                raise ParseError("VP9 descriptor truncated in its layer indices")
            layers = payload[offset]
            offset += 1
            descriptor.temporal_layer = layers >> 5
            descriptor.switching_up = bool(layers & 0x10)
            descriptor.spatial_layer = layers >> 1 & 0x07
            descriptor.inter_layer_dependency = bool(layers & 0x01)
            if not descriptor.flexible:
                if offset >= size:
                    raise ParseError("VP9 descriptor truncated in its TL0PICIDX")
                descriptor.tl0_pic_idx = payload[offset]
                offset += 1
        if descriptor.flexible and descriptor.inter_picture_predicted:
            diffs: list[int] = []
            while True:
                if offset >= size:
                    raise ParseError("VP9 descriptor truncated in its reference indices")
                if len(diffs) == 3:
                    raise ParseError("VP9 descriptor has more than 3 reference indices")
                octet = payload[offset]
                offset += 1
                if octet >> 1 == 0:
                    raise ParseError("VP9 reference index P_DIFF 0 names the picture itself")
                diffs.append(octet >> 1)
                if not octet & 0x01:
                    break
            descriptor.reference_diffs = tuple(diffs)
        if first & 0x02:
            descriptor.scalability_structure, offset = Vp9ScalabilityStructure.parse_from(
                payload, offset
            )
        return descriptor, bytes(payload[offset:])

    def serialize(self) -> bytes:
        has_layers = self.temporal_layer is not None
        with_references = self.flexible and self.inter_picture_predicted
        if not 0 <= self.spatial_layer <= 7 or not 0 <= (self.temporal_layer or 0) <= 7:
            raise ValueError("VP9 TID and SID are 0..7")
        if has_layers and not self.flexible:
            if self.tl0_pic_idx is None or not 0 <= self.tl0_pic_idx <= 0xFF:
                raise ValueError("non-flexible VP9 layer indices carry an 8-bit TL0PICIDX")
        elif self.tl0_pic_idx is not None:
            raise ValueError("TL0PICIDX only comes with layer indices in non-flexible mode")
        if with_references != bool(self.reference_diffs):
            raise ValueError("VP9 reference indices: 1..3 exactly when both F and P are set")
        if len(self.reference_diffs) > 3 or not all(1 <= d <= 127 for d in self.reference_diffs):
            raise ValueError("VP9 P_DIFFs are 1..127, at most 3")
        if not has_layers and (
            self.switching_up or self.spatial_layer or self.inter_layer_dependency
        ):
            raise ValueError("U, SID and D need layer indices (a temporal layer)")
        encoded = bytearray(
            (
                (0x80 if self.picture_id is not None else 0)
                | (0x40 if self.inter_picture_predicted else 0)
                | (0x20 if has_layers else 0)
                | (0x10 if self.flexible else 0)
                | (0x08 if self.start_of_frame else 0)
                | (0x04 if self.end_of_frame else 0)
                | (0x02 if self.scalability_structure is not None else 0)
                | (0x01 if self.not_upper_layer_reference else 0),
            )
        )
        if self.picture_id is not None:
            if self.long_picture_id:
                if not 0 <= self.picture_id <= 0x7FFF:
                    raise ValueError("a 15-bit VP9 picture id is 0..32767")
                encoded += bytes((0x80 | self.picture_id >> 8, self.picture_id & 0xFF))
            else:
                if not 0 <= self.picture_id <= 0x7F:
                    raise ValueError("a 7-bit VP9 picture id is 0..127")
                encoded.append(self.picture_id)
        if self.temporal_layer is not None:
            encoded.append(
                self.temporal_layer << 5
                | (0x10 if self.switching_up else 0)
                | self.spatial_layer << 1
                | (0x01 if self.inter_layer_dependency else 0)
            )
            if self.tl0_pic_idx is not None:
                encoded.append(self.tl0_pic_idx)
        for index, diff in enumerate(self.reference_diffs):
            more = index + 1 < len(self.reference_diffs)
            encoded.append(diff << 1 | (0x01 if more else 0))
        if self.scalability_structure is not None:
            encoded += self.scalability_structure.serialize()
        return bytes(encoded)

    __bytes__ = serialize


def _vp9_is_keyframe_start(payload: bytes) -> bool:
    """RFC 9628 §4.2 descriptor: ``|I|P|L|F|B|E|V|Z|`` then picture id, layer indices."""
    if not payload:
        return False
    first = payload[0]
    if not first & 0x08 or first & 0x40:
        # Not the beginning of a frame (B clear), or inter-picture predicted (P set).
        return False
    if not first & 0x20:
        # No layer indices: a single spatial layer, so this is layer 0.
        return True
    offset = 1
    if first & 0x80:
        if len(payload) < 2:
            return False
        offset += 2 if payload[1] & 0x80 else 1
    if offset >= len(payload):
        return False
    # Layer indices byte: |TID(3)|U|SID(3)|D|; spatial layer 0 starts the picture.
    return (payload[offset] >> 1) & 0x07 == 0


# RFC 6184 §5.4 / H.264 Table 7-1 NAL unit types.
H264_NAL_IDR_SLICE = 5
H264_NAL_SPS = 7
H264_NAL_PPS = 8
H264_NAL_STAP_A = 24
H264_NAL_FU_A = 28


def _h264_nal_starts_keyframe(nal_type: int, first_payload_byte: int | None) -> bool:
    """SPS and PPS precede an IDR; an IDR slice starts a picture only at macroblock 0.

    An IDR picture may span several slices (several NAL units); only the one whose
    slice header says first_mb_in_slice = 0 (H.264 §7.3.3: ue(v) 0 is a single 1 bit)
    begins it, so a viewer starting at a later slice would miss the top of the picture.
    """
    if nal_type in (H264_NAL_SPS, H264_NAL_PPS):
        return True
    if nal_type == H264_NAL_IDR_SLICE:
        return first_payload_byte is not None and bool(first_payload_byte & 0x80)
    return False


def _h264_is_keyframe_start(payload: bytes) -> bool:
    size = len(payload)
    if size < 1:
        return False
    nal_type = payload[0] & 0x1F
    if 1 <= nal_type <= 23:
        # RFC 6184 §5.6 single NAL unit packet.
        return _h264_nal_starts_keyframe(nal_type, payload[1] if size > 1 else None)
    if nal_type == H264_NAL_STAP_A:
        # RFC 6184 §5.7.1: 16-bit size, then the NAL unit, repeated.
        offset = 1
        while offset + 2 < size:
            nal_size = int.from_bytes(payload[offset : offset + 2], "big")
            start = offset + 2
            if nal_size == 0 or start + nal_size > size:
                return False
            inner_type = payload[start] & 0x1F
            inner_next = payload[start + 1] if nal_size > 1 else None
            if _h264_nal_starts_keyframe(inner_type, inner_next):
                return True
            offset = start + nal_size
        return False
    if nal_type == H264_NAL_FU_A:
        # RFC 6184 §5.8: FU header |S|E|R|Type|; only the first fragment (S) starts.
        if size < 2 or not payload[1] & 0x80:
            return False
        return _h264_nal_starts_keyframe(payload[1] & 0x1F, payload[2] if size > 2 else None)
    return False


def _av1_is_keyframe_start(payload: bytes) -> bool:
    # AV1 RTP spec §4.4 aggregation header |Z|Y|W W|N|-|-|-|: N marks the first packet
    # of a coded video sequence, which opens with a keyframe.
    return len(payload) > 0 and bool(payload[0] & 0x08)


_KEYFRAME_DETECTORS: dict[str, Callable[[bytes], bool]] = {
    "VP8": _vp8_is_keyframe_start,
    "VP9": _vp9_is_keyframe_start,
    "H264": _h264_is_keyframe_start,
    "AV1": _av1_is_keyframe_start,
}


def _codec_key(codec_name: str) -> str:
    # Accept both the SDP rtpmap name ("VP8") and a MIME type ("video/VP8").
    return codec_name.rpartition("/")[2].upper()


def is_keyframe_start(codec_name: str, payload: bytes) -> bool:
    """Whether this RTP payload is the first packet of a keyframe (see module notes)."""
    detector = _KEYFRAME_DETECTORS.get(_codec_key(codec_name))
    return detector is not None and detector(payload)


class _BitReader:
    """MSB-first bit reader over an H.264 RBSP with exp-Golomb codes (H.264 §9.1)."""

    __slots__ = ("_bit_length", "_position", "_value")

    def __init__(self, data: bytes) -> None:
        self._value = int.from_bytes(data, "big")
        self._bit_length = 8 * len(data)
        self._position = 0

    def bits(self, count: int) -> int:
        end = self._position + count
        if end > self._bit_length:
            raise ParseError("H.264 parameter set truncated")
        value = (self._value >> (self._bit_length - end)) & ((1 << count) - 1)
        self._position = end
        return value

    def flag(self) -> bool:
        return bool(self.bits(1))

    def unsigned_exp_golomb(self) -> int:
        leading_zeros = 0
        while not self.bits(1):
            leading_zeros += 1
            if leading_zeros > 31:
                raise ParseError("H.264 exp-Golomb code longer than 32 bits")
        return (1 << leading_zeros) - 1 + self.bits(leading_zeros)

    def signed_exp_golomb(self) -> int:
        code = self.unsigned_exp_golomb()
        # H.264 §9.1.1: 1, 2, 3, 4 ... map to 1, -1, 2, -2 ...
        return (code + 1) // 2 if code & 1 else -(code // 2)


def _remove_emulation_prevention(nal: bytes) -> bytes:
    # H.264 §7.4.1: an encoder inserts 0x03 after two zero bytes to avoid start codes.
    return nal.replace(b"\x00\x00\x03", b"\x00\x00")


# H.264 §7.3.2.1.1: profiles whose SPS carries chroma format and bit depth fields.
_HIGH_PROFILES = frozenset((100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135))


def _skip_scaling_list(reader: _BitReader, size: int) -> None:
    # H.264 §7.3.2.1.1.1: delta-coded scale values until one is 0 ("use the default").
    last_scale = next_scale = 8
    for _ in range(size):
        if next_scale != 0:
            next_scale = (last_scale + reader.signed_exp_golomb() + 256) % 256
        last_scale = next_scale or last_scale


def h264_sps_frame_size(sps: bytes) -> tuple[int, int]:
    """(width, height) in pixels, after cropping, from an SPS NAL unit (with its header).

    Follows seq_parameter_set_data() of H.264 §7.3.2.1.1 up to the frame cropping
    fields; widths count macroblocks (16 pixels) and crop units from §7.4.2.1.1.
    """
    if not sps or sps[0] & 0x1F != H264_NAL_SPS:
        raise ParseError("not an H.264 SPS NAL unit")
    reader = _BitReader(_remove_emulation_prevention(sps[1:]))
    profile_idc = reader.bits(8)
    reader.bits(16)  # constraint flags, level_idc
    reader.unsigned_exp_golomb()  # seq_parameter_set_id
    chroma_format_idc = 1
    separate_colour_plane = False
    if profile_idc in _HIGH_PROFILES:
        chroma_format_idc = reader.unsigned_exp_golomb()
        if chroma_format_idc > 3:
            raise ParseError(f"H.264 chroma_format_idc {chroma_format_idc} is invalid")
        if chroma_format_idc == 3:
            separate_colour_plane = reader.flag()
        reader.unsigned_exp_golomb()  # bit_depth_luma_minus8
        reader.unsigned_exp_golomb()  # bit_depth_chroma_minus8
        reader.flag()  # qpprime_y_zero_transform_bypass_flag
        if reader.flag():  # seq_scaling_matrix_present_flag
            for index in range(8 if chroma_format_idc != 3 else 12):
                if reader.flag():
                    _skip_scaling_list(reader, 16 if index < 6 else 64)
    reader.unsigned_exp_golomb()  # log2_max_frame_num_minus4
    pic_order_cnt_type = reader.unsigned_exp_golomb()
    if pic_order_cnt_type == 0:
        reader.unsigned_exp_golomb()  # log2_max_pic_order_cnt_lsb_minus4
    elif pic_order_cnt_type == 1:
        reader.flag()  # delta_pic_order_always_zero_flag
        reader.signed_exp_golomb()  # offset_for_non_ref_pic
        reader.signed_exp_golomb()  # offset_for_top_to_bottom_field
        cycle_length = reader.unsigned_exp_golomb()
        if cycle_length > 255:
            raise ParseError("H.264 num_ref_frames_in_pic_order_cnt_cycle exceeds 255")
        for _ in range(cycle_length):
            reader.signed_exp_golomb()
    elif pic_order_cnt_type != 2:
        raise ParseError(f"H.264 pic_order_cnt_type {pic_order_cnt_type} is invalid")
    reader.unsigned_exp_golomb()  # max_num_ref_frames
    reader.flag()  # gaps_in_frame_num_value_allowed_flag
    width_in_macroblocks = reader.unsigned_exp_golomb() + 1
    height_in_map_units = reader.unsigned_exp_golomb() + 1
    frame_mbs_only = reader.flag()
    if not frame_mbs_only:
        reader.flag()  # mb_adaptive_frame_field_flag
    reader.flag()  # direct_8x8_inference_flag
    field_factor = 1 if frame_mbs_only else 2
    width = width_in_macroblocks * 16
    height = field_factor * height_in_map_units * 16
    if reader.flag():  # frame_cropping_flag
        left, right, top, bottom = (reader.unsigned_exp_golomb() for _ in range(4))
        # H.264 §7.4.2.1.1 (7-19..7-22): crop units follow chroma subsampling.
        chroma_array_type = 0 if separate_colour_plane else chroma_format_idc
        if chroma_array_type == 0:
            crop_unit_x, crop_unit_y = 1, field_factor
        else:
            sub_width = 1 if chroma_array_type == 3 else 2
            sub_height = 2 if chroma_array_type == 1 else 1
            crop_unit_x, crop_unit_y = sub_width, sub_height * field_factor
        width -= (left + right) * crop_unit_x
        height -= (top + bottom) * crop_unit_y
    if width <= 0 or height <= 0:
        raise ParseError("H.264 SPS crops the picture to nothing")
    return width, height


def h264_keyframe_size(payload: bytes) -> tuple[int, int] | None:
    """Frame size from an SPS carried alone or in a STAP-A (RFC 6184 §5.6, §5.7.1)."""
    if not payload:
        return None
    nal_type = payload[0] & 0x1F
    if nal_type == H264_NAL_SPS:
        return h264_sps_frame_size(payload)
    if nal_type == H264_NAL_STAP_A:
        offset = 1
        while offset + 2 < len(payload):
            nal_size = int.from_bytes(payload[offset : offset + 2], "big")
            start = offset + 2
            if nal_size == 0 or start + nal_size > len(payload):
                raise ParseError("H.264 STAP-A unit runs past the payload")
            if payload[start] & 0x1F == H264_NAL_SPS:
                return h264_sps_frame_size(payload[start : start + nal_size])
            offset = start + nal_size
    return None


def vp9_keyframe_size(payload: bytes) -> tuple[int, int] | None:
    """(width, height) of the highest spatial layer from the scalability structure that
    VP9 keyframes carry (RFC 9628 §4.2.1, V and Y bits); None when absent."""
    try:
        descriptor = Vp9PayloadDescriptor.parse(payload)
    except ParseError:
        return None
    structure = descriptor.scalability_structure
    if structure is None or not structure.resolutions:
        return None
    width, height = structure.resolutions[-1]
    return (width, height) if width and height else None


_SIZE_READERS: dict[str, Callable[[bytes], tuple[int, int] | None]] = {
    "VP8": vp8_keyframe_size,
    "VP9": vp9_keyframe_size,
    "H264": h264_keyframe_size,
}


def keyframe_size(codec_name: str, payload: bytes) -> tuple[int, int] | None:
    """(width, height) when this payload carries it (VP8 keyframe start, VP9 scalability
    structure, H.264 SPS)."""
    reader = _SIZE_READERS.get(_codec_key(codec_name))
    return reader(payload) if reader is not None else None
