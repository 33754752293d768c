"""SRTP/SRTCP in the compiled core (whepfan/_srtp.pxi).

RFC test vectors pin the key derivation and the transforms byte for byte; pylibsrtp
(libsrtp) is the independent oracle for every profile in both directions, on
Hypothesis-generated packets. Every test runs once per AES-GCM backend the core was
built with (OpenSSL EVP always, intel-ipsec-mb where available: tests/test_gcm_backend.py).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pylibsrtp import Error as LibsrtpError
from pylibsrtp import Policy, Session

from whepfan import _fastpath
from whepfan._fastpath import (
    PROFILE_AEAD_AES_128_GCM,
    PROFILE_AEAD_AES_256_GCM,
    PROFILE_AES128_CM_SHA1_32,
    PROFILE_AES128_CM_SHA1_80,
    SrtpError,
    SrtpSession,
    profile_key_lengths,
)

GCM_BACKENDS = ["openssl"]
if _fastpath.gcm_backend().startswith("intel-ipsec-mb"):
    GCM_BACKENDS.append("intel-ipsec-mb")


@pytest.fixture(params=GCM_BACKENDS, autouse=True, scope="module")
def gcm_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Sessions made in the test are keyed for this AES-GCM backend."""
    before = "openssl" if _fastpath.gcm_backend() == "openssl" else "intel-ipsec-mb"
    _fastpath.use_gcm_backend(request.param)
    yield request.param
    _fastpath.use_gcm_backend(before)


# Private test hooks, not part of the public surface in _fastpath.pyi.
derive_session_keys = _fastpath._derive_session_keys
session_from_session_keys = SrtpSession._from_session_keys

ALL_PROFILES = [
    PROFILE_AES128_CM_SHA1_80,
    PROFILE_AES128_CM_SHA1_32,
    PROFILE_AEAD_AES_128_GCM,
    PROFILE_AEAD_AES_256_GCM,
]

LIBSRTP_PROFILE = {
    PROFILE_AES128_CM_SHA1_80: Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    PROFILE_AES128_CM_SHA1_32: Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
    PROFILE_AEAD_AES_128_GCM: Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
    PROFILE_AEAD_AES_256_GCM: Policy.SRTP_PROFILE_AEAD_AES_256_GCM,
}

# RTP tag length per profile (RFC 5764 §4.1.2, RFC 7714 §14.2).
RTP_TAG_LENGTH = {
    PROFILE_AES128_CM_SHA1_80: 10,
    PROFILE_AES128_CM_SHA1_32: 4,
    PROFILE_AEAD_AES_128_GCM: 16,
    PROFILE_AEAD_AES_256_GCM: 16,
}

AEAD_PROFILES = (PROFILE_AEAD_AES_128_GCM, PROFILE_AEAD_AES_256_GCM)

# SRTCP trailer: E+index (4) and the tag, 80 bits for both CM profiles (RFC 5764
# §4.1.2), 16 bytes for GCM (RFC 7714 §9).
SRTCP_TRAILER_LENGTH = {
    profile: 4 + (16 if profile in AEAD_PROFILES else 10) for profile in ALL_PROFILES
}

HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def master_key_and_salt(profile: int, seed: int = 1) -> tuple[bytes, bytes]:
    key_length, salt_length = profile_key_lengths(profile)
    key = bytes((seed * 7 + i * 13) & 0xFF for i in range(key_length))
    salt = bytes((seed * 11 + i * 29) & 0xFF for i in range(salt_length))
    return key, salt


def libsrtp_session(profile: int, key: bytes, salt: bytes, *, outbound: bool) -> Session:
    ssrc_type = Policy.SSRC_ANY_OUTBOUND if outbound else Policy.SSRC_ANY_INBOUND
    return Session(
        policy=Policy(key=key + salt, ssrc_type=ssrc_type, srtp_profile=LIBSRTP_PROFILE[profile])
    )


def rtp_packet(
    *,
    seq: int,
    ssrc: int,
    payload: bytes = b"",
    timestamp: int = 0,
    marker: bool = False,
    payload_type: int = 96,
    csrcs: tuple[int, ...] = (),
    extension: tuple[int, bytes] | None = None,
) -> bytes:
    """RFC 3550 §5.1 packet; ``extension`` is (profile, body), body a multiple of 4 bytes."""
    first = 0x80 | len(csrcs) | (0x10 if extension is not None else 0)
    header = struct.pack(
        "!BBHII", first, (0x80 if marker else 0) | payload_type, seq, timestamp, ssrc
    )
    header += b"".join(struct.pack("!I", csrc) for csrc in csrcs)
    if extension is not None:
        profile, body = extension
        header += struct.pack("!HH", profile, len(body) // 4) + body
    return header + payload


def rtcp_packet(packet_type: int, ssrc: int, body: bytes, count: int = 0) -> bytes:
    """One RTCP packet (RFC 3550 §6.4): body a multiple of 4 bytes after the SSRC."""
    length_words = (8 + len(body)) // 4 - 1
    return struct.pack("!BBHI", 0x80 | count, packet_type, length_words, ssrc) + body


# --- RFC test vectors ---------------------------------------------------------------

# RFC 3711 Appendix B.3: key derivation, master key/salt -> RTP session values.
B3_MASTER_KEY = bytes.fromhex("E1F97A0D3E018BE0D64FA32C06DE4139")
B3_MASTER_SALT = bytes.fromhex("0EC675AD498AFEEBB6960B3AABE6")
B3_CIPHER_KEY = bytes.fromhex("C61E7A93744F39EE10734AFE3FF7A087")
B3_CIPHER_SALT = bytes.fromhex("30CBBC08863D8C85D49DB34A9AE1")
# B.3 prints more keystream than n_a = 160 bits needs; HMAC-SHA1 uses the first 20 bytes.
B3_AUTH_KEY = bytes.fromhex("CEBE321F6FF7716B6FD4AB49AF256A156D38BAA4")


def test_rfc3711_b3_key_derivation() -> None:
    rtp_key, rtp_auth_key, rtp_salt, rtcp_key, rtcp_auth_key, rtcp_salt = derive_session_keys(
        PROFILE_AES128_CM_SHA1_80, B3_MASTER_KEY, B3_MASTER_SALT
    )
    assert rtp_key == B3_CIPHER_KEY
    assert rtp_salt == B3_CIPHER_SALT
    assert rtp_auth_key == B3_AUTH_KEY
    # SRTCP values use labels 3-5 (§4.3.2): same sizes, different values.
    assert (len(rtcp_key), len(rtcp_auth_key), len(rtcp_salt)) == (16, 20, 14)
    assert rtcp_key != rtp_key and rtcp_salt != rtp_salt and rtcp_auth_key != rtp_auth_key


def test_gcm_key_derivation_sizes() -> None:
    # RFC 7714 §11: AES-CM PRF with the master key's size; 96-bit session salts, no
    # auth keys (GCM authenticates by itself).
    for profile, key_length in ((PROFILE_AEAD_AES_128_GCM, 16), (PROFILE_AEAD_AES_256_GCM, 32)):
        key, salt = master_key_and_salt(profile)
        rtp_key, rtp_auth, rtp_salt, rtcp_key, rtcp_auth, rtcp_salt = derive_session_keys(
            profile, key, salt
        )
        assert (len(rtp_key), len(rtp_salt), len(rtcp_key), len(rtcp_salt)) == (
            key_length,
            12,
            key_length,
            12,
        )
        assert rtp_auth == rtcp_auth == b""


# RFC 3711 Appendix B.2: AES-CM keystream for session key 2B7E...3C and session salt
# F0F1...FD. With SSRC 0 and index 0 the IV is the salt * 2^16 (§4.1.1), so the
# encryption of a zero payload is the first keystream segments.
B2_SESSION_KEY = bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C")
B2_SESSION_SALT = bytes.fromhex("F0F1F2F3F4F5F6F7F8F9FAFBFCFD")
B2_KEYSTREAM = bytes.fromhex(
    "E03EAD0935C95E80E166B16DD92B4EB4"
    "D23513162B02D0F72A43A2FE4A5F97AB"
    "41E95B3BB0A2E8DD477901E4FCA894C0"
)


def test_rfc3711_b2_aes_cm_keystream() -> None:
    auth_key = bytes(20)
    session = session_from_session_keys(
        PROFILE_AES128_CM_SHA1_80,
        B2_SESSION_KEY,
        auth_key,
        B2_SESSION_SALT,
        B2_SESSION_KEY,
        auth_key,
        B2_SESSION_SALT,
    )
    packet = rtp_packet(seq=0, ssrc=0, payload=bytes(len(B2_KEYSTREAM)))
    protected = session.protect(packet)
    assert protected[12 : 12 + len(B2_KEYSTREAM)] == B2_KEYSTREAM


# RFC 7714 §16: the same RTP packet (SSRC 5501a0b2, SEQ f17b, ROC 0) under session key
# 000102..0f (128) or 000102..1f (256) and session salt "Quid pro quo".
RFC7714_SALT = bytes.fromhex("517569642070726f2071756f")
RFC7714_RTP = bytes.fromhex(
    "8040f17b8041f8d35501a0b2"
    "47616c6c696120657374206f6d6e69732064697669736120696e207061727465732074726573"
)
# §16.1.1: AEAD_AES_128_GCM encryption (ciphertext || tag).
RFC7714_SRTP_128 = bytes.fromhex(
    "8040f17b8041f8d35501a0b2"
    "f24de3a3fb34de6cacba861c9d7e4bcabe633bd50d294e6f42a5f47a51c7d19b36de3adf8833"
    "899d7f27beb16a9152cf765ee4390cce"
)
# §16.2.1: AEAD_AES_256_GCM encryption.
RFC7714_SRTP_256 = bytes.fromhex(
    "8040f17b8041f8d35501a0b2"
    "32b1de78a822fe12ef9f78fa332e33aab18012389a58e2f3b50b2a0276ffae0f1ba63799b87b"
    "7aa3db36dfffd6b0f9bb7878d7a76c13"
)
# §17: the SRTCP packet (sender SSRC "Mars"), SRTCP index 0x5d4.
RFC7714_RTCP = bytes.fromhex(
    "81c8000d4d6172734e5450314e545032525450200000042a0000e930"
    "4c756e61deadbeefdeadbeefdeadbeefdeadbeefdeadbeef"
)
# §17.1: AEAD_AES_128_GCM, E=1 (ciphertext || tag || E+index).
RFC7714_SRTCP_128 = bytes.fromhex(
    "81c8000d4d61727363e94885dcdab67ca727d7662f6b7e997ff5c0f76c06f32dc676a5f1730d6fda"
    "4ce09b4686303ded0bb9275bc84aa45896cf4d2fc5abf87245d9eade800005d4"
)
# §17.2: AEAD_AES_256_GCM, E=1.
RFC7714_SRTCP_256 = bytes.fromhex(
    "81c8000d4d617273d50ae4d1f5ce5d304ba297e47d470c282c3ece5dbffe0a50a2eaa5c1110555be"
    "8415f658c61de0476f1b6fad1d1eb30c4446839f57ff6f6cb26ac3be800005d4"
)
# §17.3: AEAD_AES_128_GCM, E=0: the whole packet is associated data, nothing encrypted.
RFC7714_SRTCP_128_TAG_ONLY = bytes.fromhex(
    "81c8000d4d6172734e5450314e545032525450200000042a0000e9304c756e61deadbeefdeadbeef"
    "deadbeefdeadbeefdeadbeef841dd9683dd78ec92ae58790125f62b3000005d4"
)


def rfc7714_session(profile: int) -> SrtpSession:
    key = bytes(range(16 if profile == PROFILE_AEAD_AES_128_GCM else 32))
    session: SrtpSession = session_from_session_keys(
        profile, key, b"", RFC7714_SALT, key, b"", RFC7714_SALT
    )
    return session


@pytest.mark.parametrize(
    ("profile", "expected"),
    [(PROFILE_AEAD_AES_128_GCM, RFC7714_SRTP_128), (PROFILE_AEAD_AES_256_GCM, RFC7714_SRTP_256)],
)
def test_rfc7714_16_srtp_vectors(profile: int, expected: bytes) -> None:
    assert rfc7714_session(profile).protect(RFC7714_RTP) == expected
    assert rfc7714_session(profile).unprotect(expected) == RFC7714_RTP


@pytest.mark.parametrize(
    ("profile", "protected"),
    [
        (PROFILE_AEAD_AES_128_GCM, RFC7714_SRTCP_128),
        (PROFILE_AEAD_AES_256_GCM, RFC7714_SRTCP_256),
        (PROFILE_AEAD_AES_128_GCM, RFC7714_SRTCP_128_TAG_ONLY),
    ],
)
def test_rfc7714_17_srtcp_vectors(profile: int, protected: bytes) -> None:
    assert rfc7714_session(profile).unprotect_rtcp(protected) == RFC7714_RTCP


def test_rfc7714_17_srtcp_vector_rejects_flipped_index() -> None:
    # The E flag and index are associated data (§9.2): changing them breaks the tag.
    tampered = RFC7714_SRTCP_128[:-1] + bytes([RFC7714_SRTCP_128[-1] ^ 1])
    with pytest.raises(SrtpError) as caught:
        rfc7714_session(PROFILE_AEAD_AES_128_GCM).unprotect_rtcp(tampered)
    assert caught.value.reason == "auth"


# --- profiles and construction ---------------------------------------------------------


def test_profile_key_lengths() -> None:
    # RFC 5764 §4.1.2 and RFC 7714 §14.2: (master key, master salt) bytes.
    assert profile_key_lengths(PROFILE_AES128_CM_SHA1_80) == (16, 14)
    assert profile_key_lengths(PROFILE_AES128_CM_SHA1_32) == (16, 14)
    assert profile_key_lengths(PROFILE_AEAD_AES_128_GCM) == (16, 12)
    assert profile_key_lengths(PROFILE_AEAD_AES_256_GCM) == (32, 12)
    with pytest.raises(ValueError):
        profile_key_lengths(0x0003)
    assert (PROFILE_AES128_CM_SHA1_80, PROFILE_AEAD_AES_256_GCM) == (0x0001, 0x0008)


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_session_rejects_wrong_key_or_salt_length(profile: int) -> None:
    key, salt = master_key_and_salt(profile)
    with pytest.raises(ValueError):
        SrtpSession(profile, key[:-1], salt)
    with pytest.raises(ValueError):
        SrtpSession(profile, key, salt + b"\0")
    with pytest.raises(ValueError):
        SrtpSession(0x0005, key, salt)


def test_srtp_error_is_a_value_error_with_reason() -> None:
    session = SrtpSession(PROFILE_AES128_CM_SHA1_80, *master_key_and_salt(1))
    with pytest.raises(ValueError) as caught:
        session.unprotect(b"\x80\x60")
    assert isinstance(caught.value, SrtpError)
    assert caught.value.reason == "malformed"


# --- differential against libsrtp -------------------------------------------------------


@dataclass(frozen=True)
class RtpSpec:
    ssrc_slot: int
    seq_step: int
    payload: bytes
    marker: bool
    csrcs: tuple[int, ...]
    extension: tuple[int, bytes] | None


rtp_specs = st.builds(
    RtpSpec,
    ssrc_slot=st.integers(0, 3),
    # Steps below 2^15 keep the RFC 3711 §3.3.1 estimate unambiguous; large ones cross
    # 65535 -> 0 every few packets, so a list of them rolls the ROC over several times.
    seq_step=st.one_of(st.integers(1, 3), st.integers(20000, 32000)),
    payload=st.binary(min_size=0, max_size=1400),
    marker=st.booleans(),
    csrcs=st.lists(st.integers(0, 2**32 - 1), max_size=15).map(tuple),
    extension=st.one_of(
        st.none(),
        st.tuples(
            st.sampled_from([0xBEDE, 0x1000, 0x0000]),
            st.integers(0, 8).flatmap(
                lambda words: st.binary(min_size=4 * words, max_size=4 * words)
            ),
        ),
    ),
)

SSRCS = (0x11111111, 0x5501A0B2, 0xFFFFFFFF, 0x00000000)


def build_stream(specs: list[RtpSpec], first_seqs: tuple[int, ...]) -> list[bytes]:
    next_seq = list(first_seqs)
    packets = []
    for number, spec in enumerate(specs):
        slot = spec.ssrc_slot
        packets.append(
            rtp_packet(
                seq=next_seq[slot],
                ssrc=SSRCS[slot],
                payload=spec.payload,
                timestamp=number * 3000,
                marker=spec.marker,
                csrcs=spec.csrcs,
                extension=spec.extension,
            )
        )
        next_seq[slot] = (next_seq[slot] + spec.seq_step) & 0xFFFF
    return packets


first_seqs = st.tuples(*[st.integers(0, 0xFFFF)] * len(SSRCS))


@pytest.mark.parametrize("profile", ALL_PROFILES)
@HYPOTHESIS
@given(specs=st.lists(rtp_specs, min_size=1, max_size=24), seqs=first_seqs)
def test_rtp_matches_libsrtp_both_directions(
    profile: int, specs: list[RtpSpec], seqs: tuple[int, ...]
) -> None:
    key, salt = master_key_and_salt(profile)
    ours_tx, ours_rx = SrtpSession(profile, key, salt), SrtpSession(profile, key, salt)
    theirs_tx = libsrtp_session(profile, key, salt, outbound=True)
    theirs_rx = libsrtp_session(profile, key, salt, outbound=False)
    for packet in build_stream(specs, seqs):
        protected = ours_tx.protect(packet)
        # SRTP is deterministic: same keys, same index, same bytes as libsrtp.
        assert protected == theirs_tx.protect(packet)
        assert len(protected) == len(packet) + RTP_TAG_LENGTH[profile]
        assert theirs_rx.unprotect(protected) == packet
        assert ours_rx.unprotect(protected) == packet


compound_rtcp = st.lists(
    st.tuples(
        st.sampled_from([200, 201, 202, 203, 205, 206]),
        st.integers(0, 31),
        st.integers(0, 30).flatmap(lambda words: st.binary(min_size=4 * words, max_size=4 * words)),
    ),
    min_size=1,
    max_size=4,
)


@pytest.mark.parametrize("profile", ALL_PROFILES)
@HYPOTHESIS
@given(
    packets=st.lists(st.tuples(st.integers(0, 3), compound_rtcp), min_size=1, max_size=12),
)
def test_rtcp_matches_libsrtp_both_directions(
    profile: int, packets: list[tuple[int, list[tuple[int, int, bytes]]]]
) -> None:
    key, salt = master_key_and_salt(profile)
    ours_tx, ours_rx = SrtpSession(profile, key, salt), SrtpSession(profile, key, salt)
    theirs_tx = libsrtp_session(profile, key, salt, outbound=True)
    theirs_rx = libsrtp_session(profile, key, salt, outbound=False)
    for slot, parts in packets:
        compound = b"".join(
            rtcp_packet(packet_type, SSRCS[slot], body, count) for packet_type, count, body in parts
        )
        protected = ours_tx.protect_rtcp(compound)
        assert len(protected) == len(compound) + SRTCP_TRAILER_LENGTH[profile]
        assert theirs_rx.unprotect_rtcp(protected) == compound
        assert ours_rx.unprotect_rtcp(theirs_tx.protect_rtcp(compound)) == compound


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_srtcp_index_counts_per_ssrc_with_e_flag(profile: int) -> None:
    # RFC 3711 §3.4: index starts at 0 and counts per SSRC; E set (we always encrypt).
    session = SrtpSession(profile, *master_key_and_salt(profile))
    aead = profile in AEAD_PROFILES

    def e_and_index(protected: bytes) -> int:
        word = protected[-4:] if aead else protected[-14:-10]
        return int(struct.unpack("!I", word)[0])

    first = rtcp_packet(201, 1, b"")
    second = rtcp_packet(201, 2, b"")
    assert [e_and_index(session.protect_rtcp(first)) for _ in range(3)] == [
        0x80000000,
        0x80000001,
        0x80000002,
    ]
    assert e_and_index(session.protect_rtcp(second)) == 0x80000000


# --- ROC, retransmission, replay ----------------------------------------------------


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_roc_rollover_through_many_wraps(profile: int) -> None:
    key, salt = master_key_and_salt(profile)
    ours_tx = SrtpSession(profile, key, salt)
    theirs_rx = libsrtp_session(profile, key, salt, outbound=False)
    seq = 65000
    for number in range(40):  # 40 steps of 30000: ~18 wraps
        packet = rtp_packet(seq=seq, ssrc=7, payload=bytes([number]) * 50)
        assert theirs_rx.unprotect(ours_tx.protect(packet)) == packet
        seq = (seq + 30000) & 0xFFFF


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_retransmission_of_older_seq_keeps_its_roc(profile: int) -> None:
    key, salt = master_key_and_salt(profile)
    ours_tx = SrtpSession(profile, key, salt)
    reference_tx = libsrtp_session(profile, key, salt, outbound=True)
    theirs_rx = libsrtp_session(profile, key, salt, outbound=False)
    packets = {
        seq: rtp_packet(seq=seq, ssrc=9, payload=bytes([seq & 0xFF]) * 100)
        for seq in [*range(65530, 65536), *range(6)]
    }
    lost = 65533  # ROC 0, sent before the wrap to ROC 1
    originals = {}
    for seq, packet in packets.items():
        originals[seq] = ours_tx.protect(packet)
        assert originals[seq] == reference_tx.protect(packet)
        if seq != lost:
            assert theirs_rx.unprotect(originals[seq]) == packets[seq]
    # The retransmission gets ROC 0 back: same bytes as the original, and libsrtp,
    # which never saw the original, accepts it.
    retransmission = ours_tx.protect(packets[lost])
    assert retransmission == originals[lost]
    assert theirs_rx.unprotect(retransmission) == packets[lost]
    # State did not move back: the next new packet is still ROC 1.
    following = rtp_packet(seq=6, ssrc=9, payload=b"after")
    assert theirs_rx.unprotect(ours_tx.protect(following)) == following


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_replayed_and_too_old_packets_are_rejected(profile: int) -> None:
    key, salt = master_key_and_salt(profile)
    tx, rx = SrtpSession(profile, key, salt), SrtpSession(profile, key, salt)
    protected = [tx.protect(rtp_packet(seq=seq, ssrc=3, payload=b"x" * 20)) for seq in range(200)]
    rx.unprotect(protected[100])
    with pytest.raises(SrtpError) as caught:
        rx.unprotect(protected[100])
    assert caught.value.reason == "replay"
    # RFC 3711 §3.3.2: 64-packet window behind the highest index.
    rx.unprotect(protected[37])  # 63 behind: inside the window, first time
    with pytest.raises(SrtpError) as caught:
        rx.unprotect(protected[36])  # 64 behind: left of the window
    assert caught.value.reason == "replay"
    rx.unprotect(protected[199])  # jump forward
    with pytest.raises(SrtpError) as caught:
        rx.unprotect(protected[120])  # 79 behind the new highest
    assert caught.value.reason == "replay"
    rx.unprotect(protected[150])  # 49 behind, unseen: accepted out of order
    with pytest.raises(SrtpError) as caught:
        rx.unprotect(protected[150])
    assert caught.value.reason == "replay"


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_replayed_srtcp_is_rejected(profile: int) -> None:
    key, salt = master_key_and_salt(profile)
    tx, rx = SrtpSession(profile, key, salt), SrtpSession(profile, key, salt)
    protected = [tx.protect_rtcp(rtcp_packet(200, 5, bytes(20))) for _ in range(100)]
    rx.unprotect_rtcp(protected[80])
    for index in (80, 16):  # a replay, and one left of the 64-wide window
        with pytest.raises(SrtpError) as caught:
            rx.unprotect_rtcp(protected[index])
        assert caught.value.reason == "replay"
    rx.unprotect_rtcp(protected[17])  # 63 behind, unseen
    rx.unprotect_rtcp(protected[99])


# --- tampering, garbage, limits ---------------------------------------------------


# Bits of the first octet that change how the header parses (V, X, CC: RFC 3550 §5.1);
# flipping them, or the header extension's length (§5.3.1), can make the packet
# unparseable instead of unauthentic.
HEADER_SHAPE_BITS = 0xDF


def changes_header_shape(spec: RtpSpec, position: int, bit: int) -> bool:
    if position == 0:
        return bool((1 << bit) & HEADER_SHAPE_BITS)
    extension_length_at = 12 + 4 * len(spec.csrcs) + 2
    return spec.extension is not None and position in (
        extension_length_at,
        extension_length_at + 1,
    )


@pytest.mark.parametrize("profile", ALL_PROFILES)
@HYPOTHESIS
@given(spec=rtp_specs, position=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_any_flipped_bit_fails_authentication(
    profile: int, spec: RtpSpec, position: int, bit: int
) -> None:
    key, salt = master_key_and_salt(profile)
    tx, rx = SrtpSession(profile, key, salt), SrtpSession(profile, key, salt)
    protected = tx.protect(build_stream([spec], (1000, 2000, 3000, 4000))[0])
    position %= len(protected)
    tampered = bytearray(protected)
    tampered[position] ^= 1 << bit
    with pytest.raises(SrtpError) as caught:
        rx.unprotect(bytes(tampered))
    if changes_header_shape(spec, position, bit):
        assert caught.value.reason in ("auth", "malformed")
    else:
        assert caught.value.reason == "auth"
    # A rejected packet leaves no trace: the genuine one still goes through.
    rx.unprotect(protected)


@pytest.mark.parametrize("profile", ALL_PROFILES)
@HYPOTHESIS
@given(parts=compound_rtcp, position=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_any_flipped_bit_in_srtcp_fails_authentication(
    profile: int, parts: list[tuple[int, int, bytes]], position: int, bit: int
) -> None:
    key, salt = master_key_and_salt(profile)
    tx, rx = SrtpSession(profile, key, salt), SrtpSession(profile, key, salt)
    compound = b"".join(rtcp_packet(kind, 0x1234, body, count) for kind, count, body in parts)
    protected = tx.protect_rtcp(compound)
    position %= len(protected)
    tampered = bytearray(protected)
    tampered[position] ^= 1 << bit
    with pytest.raises(SrtpError) as caught:
        rx.unprotect_rtcp(bytes(tampered))
    if position == 0 and bit >= 6:  # the version bits
        assert caught.value.reason == "malformed"
    else:
        assert caught.value.reason == "auth"
    assert rx.unprotect_rtcp(protected) == compound


@pytest.mark.parametrize("profile", ALL_PROFILES)
@HYPOTHESIS
@given(data=st.binary(max_size=300))
def test_random_bytes_only_return_or_raise_srtp_error(profile: int, data: bytes) -> None:
    session = SrtpSession(profile, *master_key_and_salt(profile))
    for operation in (
        session.unprotect,
        session.unprotect_rtcp,
        session.protect,
        session.protect_rtcp,
    ):
        try:
            result = operation(data)
        except SrtpError as error:
            assert error.reason in ("malformed", "auth", "replay", "streams")
        else:
            assert isinstance(result, bytes)


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_truncated_and_non_rtp_input_is_malformed(profile: int) -> None:
    key, salt = master_key_and_salt(profile)
    tx, rx = SrtpSession(profile, key, salt), SrtpSession(profile, key, salt)
    packet = rtp_packet(seq=1, ssrc=1, csrcs=(1, 2), extension=(0xBEDE, bytes(8)))
    protected = tx.protect(packet)
    header_length = len(packet)
    for cut in range(header_length + RTP_TAG_LENGTH[profile]):
        with pytest.raises(SrtpError) as caught:
            rx.unprotect(protected[:cut])
        assert caught.value.reason == "malformed", cut
    for bad in (b"", b"\x80" * 11, b"\x40" + bytes(30), rtp_packet(seq=1, ssrc=1)[:-1]):
        with pytest.raises(SrtpError) as caught:
            tx.protect(bad)
        assert caught.value.reason == "malformed"
    # A header extension whose length runs past the end of the packet.
    overlong = rtp_packet(seq=1, ssrc=1, extension=(0xBEDE, bytes(4)))
    overlong = overlong[:14] + b"\x00\x09" + overlong[16:]
    with pytest.raises(SrtpError) as caught:
        tx.protect(overlong)
    assert caught.value.reason == "malformed"
    for bad in (b"", b"\x80\xc8\x00\x01\x00\x00\x00", b"\x00\xc8\x00\x01\x00\x00\x00\x01"):
        with pytest.raises(SrtpError) as caught:
            tx.protect_rtcp(bad)
        assert caught.value.reason == "malformed"
    with pytest.raises(SrtpError) as caught:
        short = tx.protect_rtcp(rtcp_packet(201, 1, b""))[: 7 + SRTCP_TRAILER_LENGTH[profile]]
        rx.unprotect_rtcp(short)
    assert caught.value.reason == "malformed"


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_ssrc_table_is_bounded_and_forgeries_do_not_fill_it(profile: int) -> None:
    key, salt = master_key_and_salt(profile)
    tx, rx = SrtpSession(profile, key, salt), SrtpSession(profile, key, salt)
    # Forged packets from 50 unknown SSRCs fail authentication and take no slot.
    for ssrc in range(1000, 1050):
        forged = rtp_packet(seq=1, ssrc=ssrc, payload=bytes(40))
        with pytest.raises(SrtpError) as caught:
            rx.unprotect(forged)
        assert caught.value.reason == "auth"
    # SRTP_MAX_STREAMS = 8 SSRCs per context.
    for ssrc in range(8):
        packet = rtp_packet(seq=1, ssrc=ssrc, payload=b"ok")
        assert rx.unprotect(tx.protect(packet)) == packet
    ninth = rtp_packet(seq=1, ssrc=8, payload=b"ok")
    with pytest.raises(SrtpError) as caught:
        tx.protect(ninth)
    assert caught.value.reason == "streams"
    with pytest.raises(SrtpError) as caught:
        tx.protect_rtcp(rtcp_packet(200, 8, bytes(20)))
    assert caught.value.reason == "streams"
    with pytest.raises(SrtpError) as caught:
        rx.unprotect(libsrtp_session(profile, key, salt, outbound=True).protect(ninth))
    assert caught.value.reason == "streams"


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_libsrtp_rejects_our_tampered_packets_too(profile: int) -> None:
    # The oracle agrees that a modified tag does not verify.
    key, salt = master_key_and_salt(profile)
    protected = bytearray(SrtpSession(profile, key, salt).protect(rtp_packet(seq=5, ssrc=5)))
    protected[-1] ^= 0x80
    with pytest.raises(LibsrtpError):
        libsrtp_session(profile, key, salt, outbound=False).unprotect(bytes(protected))
