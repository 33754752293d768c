"""The compiled core's two AES-GCM backends (whepfan/includes/gcm_mb.h): OpenSSL EVP and
intel-ipsec-mb. tests/test_srtp.py runs every SRTP test on each; here: the build uses
intel-ipsec-mb wherever it can, the backends agree byte for byte in both directions, the
fallbacks (unencrypted SRTCP's long AAD, WHEPFAN_GCM=openssl) work, and pylibsrtp
decrypts what the fan-out sends with either.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fanout import attach, open_sender, open_viewer
from test_srtp import RFC7714_RTCP, RFC7714_SRTCP_128_TAG_ONLY, rfc7714_session

from whepfan import _fastpath
from whepfan._fastpath import (
    PROFILE_AEAD_AES_128_GCM,
    PROFILE_AEAD_AES_256_GCM,
    Fanout,
    SrtpError,
    SrtpSession,
    profile_key_lengths,
)

HEADER_INSTALLED = any(
    os.path.exists(os.path.join(folder, "intel-ipsec-mb.h"))
    for folder in ("/usr/include", "/usr/local/include")
)
CPU_HAS_AES_NI = platform.machine() == "x86_64" and " aes " in Path("/proc/cpuinfo").read_text()
MB_AVAILABLE = _fastpath.gcm_backend().startswith("intel-ipsec-mb")
needs_mb = pytest.mark.skipif(not MB_AVAILABLE, reason="core built without intel-ipsec-mb")
AEAD = (PROFILE_AEAD_AES_128_GCM, PROFILE_AEAD_AES_256_GCM)


@pytest.fixture(autouse=True)
def restore_backend() -> Iterator[None]:
    before = "openssl" if _fastpath.gcm_backend() == "openssl" else "intel-ipsec-mb"
    yield
    _fastpath.use_gcm_backend(before)


def keys(profile: int) -> tuple[bytes, bytes]:
    key_length, salt_length = profile_key_lengths(profile)
    return bytes(range(3, 3 + key_length)), bytes(range(90, 90 + salt_length))


def session(profile: int, backend: str) -> SrtpSession:
    _fastpath.use_gcm_backend(backend)
    key, salt = keys(profile)
    return SrtpSession(profile, key, salt)


def rtp(seq: int, payload: bytes, *, ssrc: int = 0x5501A0B2, extension: bool = False) -> bytes:
    first = 0x90 if extension else 0x80
    header = bytes([first, 96]) + seq.to_bytes(2, "big") + (seq * 3000).to_bytes(4, "big")
    header += ssrc.to_bytes(4, "big")
    if extension:
        # RFC 8285 one-byte block with a transport-wide sequence number (id 3).
        header += bytes([0xBE, 0xDE, 0, 1, 0x31, seq >> 8 & 0xFF, seq & 0xFF, 0])
    return header + payload


def test_built_with_intel_ipsec_mb_where_it_can_run() -> None:
    # setup.py links it whenever the header is installed; a silent fallback to EVP on
    # such a machine would cost every viewer's packets ~0.4 us.
    if HEADER_INSTALLED and CPU_HAS_AES_NI:
        assert MB_AVAILABLE, _fastpath.gcm_backend()
        assert _fastpath.gcm_backend().split()[-1].strip("()") in ("sse", "avx", "avx2", "avx512")
    else:
        assert _fastpath.gcm_backend() == "openssl"


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown AES-GCM backend"):
        _fastpath.use_gcm_backend("boringssl")


def test_environment_keeps_every_context_on_openssl() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from whepfan import _fastpath; print(_fastpath.gcm_backend())"],
        env={**os.environ, "WHEPFAN_GCM": "openssl"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "openssl"


@needs_mb
@pytest.mark.parametrize("profile", AEAD)
@settings(max_examples=80, deadline=None)
@given(
    payloads=st.lists(st.binary(min_size=0, max_size=1400), min_size=1, max_size=12),
    first_seq=st.integers(0, 0xFFFF),
    extension=st.booleans(),
)
def test_backends_agree_on_rtp_both_ways(
    profile: int, payloads: list[bytes], first_seq: int, extension: bool
) -> None:
    mb_sender, evp_sender = session(profile, "intel-ipsec-mb"), session(profile, "openssl")
    mb_receiver, evp_receiver = session(profile, "intel-ipsec-mb"), session(profile, "openssl")
    for offset, payload in enumerate(payloads):
        packet = rtp((first_seq + offset) & 0xFFFF, payload, extension=extension)
        sealed = mb_sender.protect(packet)
        assert sealed == evp_sender.protect(packet)
        assert evp_receiver.unprotect(sealed) == packet
        assert mb_receiver.unprotect(sealed) == packet


@needs_mb
@pytest.mark.parametrize("profile", AEAD)
@settings(max_examples=60, deadline=None)
@given(body=st.binary(min_size=0, max_size=600).map(lambda b: b[: len(b) // 4 * 4]))
def test_backends_agree_on_srtcp_both_ways(profile: int, body: bytes) -> None:
    words = (len(body) + 4) // 4
    packet = bytes([0x80, 201]) + words.to_bytes(2, "big") + b"Mars" + body
    sealed = session(profile, "intel-ipsec-mb").protect_rtcp(packet)
    assert sealed == session(profile, "openssl").protect_rtcp(packet)
    assert session(profile, "openssl").unprotect_rtcp(sealed) == packet
    assert session(profile, "intel-ipsec-mb").unprotect_rtcp(sealed) == packet


@needs_mb
@pytest.mark.parametrize("profile", AEAD)
def test_tampered_packet_fails_and_leaves_no_plaintext(profile: int) -> None:
    sealed = bytearray(session(profile, "intel-ipsec-mb").protect(rtp(7, b"secret" * 100)))
    sealed[40] ^= 0x01
    receiver = session(profile, "intel-ipsec-mb")
    with pytest.raises(SrtpError) as caught:
        receiver.unprotect(bytes(sealed))
    assert caught.value.reason == "auth"
    # The next genuine packet still opens: a failed tag check leaves the stream state.
    assert receiver.unprotect(session(profile, "openssl").protect(rtp(8, b"x"))) == rtp(8, b"x")


@needs_mb
def test_unencrypted_srtcp_opens_through_the_evp_fallback() -> None:
    # E = 0 (RFC 7714 §9.3, the §17.3 vector): the whole 68-byte packet is AAD, more than
    # gcm_mb.h joins on the stack for the one-shot call, so an intel-ipsec-mb context
    # hands it to its EVP context; a tampered packet still fails.
    _fastpath.use_gcm_backend("intel-ipsec-mb")
    assert (
        rfc7714_session(PROFILE_AEAD_AES_128_GCM).unprotect_rtcp(RFC7714_SRTCP_128_TAG_ONLY)
        == RFC7714_RTCP
    )
    tampered = bytearray(RFC7714_SRTCP_128_TAG_ONLY)
    tampered[20] ^= 0x04
    with pytest.raises(SrtpError) as caught:
        rfc7714_session(PROFILE_AEAD_AES_128_GCM).unprotect_rtcp(bytes(tampered))
    assert caught.value.reason == "auth"


@needs_mb
def test_e_flag_is_authenticated_on_the_joined_aad() -> None:
    # E = 1: AAD = header(8) || E+index(4), joined on the stack (gcm_mb.h); flipping the
    # E flag changes the AAD and must fail the tag.
    profile = PROFILE_AEAD_AES_128_GCM
    body = bytes(range(200)) * 2
    packet = bytes([0x80, 201]) + ((len(body) + 4) // 4).to_bytes(2, "big") + b"Mars" + body
    sealed = bytearray(session(profile, "intel-ipsec-mb").protect_rtcp(packet))
    assert session(profile, "intel-ipsec-mb").unprotect_rtcp(bytes(sealed)) == packet
    sealed[-4] ^= 0x80
    with pytest.raises(SrtpError):
        session(profile, "intel-ipsec-mb").unprotect_rtcp(bytes(sealed))


@pytest.mark.parametrize("backend", ["openssl", "intel-ipsec-mb"])
@pytest.mark.parametrize("profile", AEAD)
def test_fanout_output_decrypts_with_libsrtp(backend: str, profile: int) -> None:
    # Push (one datagram per viewer) and push_batch (GSO runs) both go through the
    # backend the viewers were keyed with; libsrtp is the independent oracle, and the
    # viewer's SRTCP (sealed by libsrtp) opens in the core.
    if backend == "intel-ipsec-mb" and not MB_AVAILABLE:
        pytest.skip("core built without intel-ipsec-mb")
    _fastpath.use_gcm_backend(backend)
    viewers = [open_viewer(profile) for _ in range(3)]
    with open_sender() as sender:
        fanout = Fanout(sender.fileno())
        track = fanout.add_track()
        for index, viewer in enumerate(viewers):
            attach(fanout, viewer)
            fanout.subscribe(
                viewer.slot, track, ssrc=0x1000 + index, payload_type=96, wait_keyframe=False
            )
        single = [rtp(100 + i, bytes([i]) * (300 + i)) for i in range(5)]
        batch = [rtp(105 + i, bytes([9]) * 900) for i in range(4)]
        for packet in single:
            fanout.push(track, packet)
        fanout.push_batch(track, batch)
        for index, viewer in enumerate(viewers):
            clear = viewer.receive_rtp(len(single) + len(batch))
            assert [int.from_bytes(p[8:12], "big") for p in clear] == [0x1000 + index] * 9
            assert [int.from_bytes(p[2:4], "big") for p in clear] == sorted(
                int.from_bytes(p[2:4], "big") for p in clear
            )
            assert [p[12:] for p in clear[:5]] == [p[12:] for p in single]
            report = bytes([0x80, 201, 0, 1]) + (0x2000 + index).to_bytes(4, "big")
            assert (
                fanout.unprotect_rtcp(viewer.slot, viewer.outbound.protect_rtcp(report)) == report
            )
        for viewer in viewers:
            viewer.sock.close()
