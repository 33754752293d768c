"""DTLS-SRTP sessions against each other in memory: no sockets."""

from __future__ import annotations

import functools
import struct
import time

import pylibsrtp
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from whepfan.protocol.dtls import (
    DEFAULT_MTU,
    DEFAULT_SRTP_PROFILES,
    DtlsCertificate,
    DtlsClosed,
    DtlsConnected,
    DtlsFailed,
    DtlsSession,
    SrtpProfile,
    _pack_records,
    _ProfileParameters,
    _split_keying_material,
    certificate_fingerprint,
)

CLIENT_HELLO = 1  # RFC 5246 §7.4 HandshakeType client_hello
HANDSHAKE = 22  # RFC 5246 §6.2.1 ContentType handshake


@functools.cache
def ecdsa_certificate(name: str) -> DtlsCertificate:
    return DtlsCertificate.generate()


@functools.cache
def rsa_certificate() -> DtlsCertificate:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return DtlsCertificate.from_private_key(key)


def make_pair(
    *,
    client_certificate: DtlsCertificate | None = None,
    server_certificate: DtlsCertificate | None = None,
    client_profiles: tuple[int, ...] | None = None,
    server_profiles: tuple[int, ...] | None = None,
    client_expects: list[tuple[str, str]] | None = None,
    server_expects: list[tuple[str, str]] | None = None,
) -> tuple[DtlsSession, DtlsSession]:
    client_certificate = client_certificate or ecdsa_certificate("client")
    server_certificate = server_certificate or ecdsa_certificate("server")
    client = DtlsSession(
        certificate=client_certificate,
        role="client",
        remote_fingerprints=(
            server_certificate.fingerprints if client_expects is None else client_expects
        ),
        profiles=client_profiles or DEFAULT_SRTP_PROFILES,
    )
    server = DtlsSession(
        certificate=server_certificate,
        role="server",
        remote_fingerprints=(
            client_certificate.fingerprints if server_expects is None else server_expects
        ),
        profiles=server_profiles or DEFAULT_SRTP_PROFILES,
    )
    return client, server


def pump(client: DtlsSession, server: DtlsSession, now: float = 0.0) -> list[bytes]:
    """Carry datagrams both ways until both sides are quiet; return all of them."""
    carried = []
    for _ in range(20):
        moved = False
        for source, destination in ((client, server), (server, client)):
            for datagram in source.datagrams_to_send():
                carried.append(datagram)
                destination.receive(datagram, now)
                moved = True
        if not moved:
            break
    return carried


def handshake(client: DtlsSession, server: DtlsSession) -> list[bytes]:
    server.start(0.0)
    client.start(0.0)
    return pump(client, server)


def events(session: DtlsSession) -> list:
    collected = []
    while (event := session.next_event()) is not None:
        collected.append(event)
    return collected


def assert_mirrored(client_event: object, server_event: object) -> None:
    assert isinstance(client_event, DtlsConnected)
    assert isinstance(server_event, DtlsConnected)
    assert client_event.profile == server_event.profile
    assert client_event.local_key == server_event.remote_key
    assert client_event.local_salt == server_event.remote_salt
    assert client_event.remote_key == server_event.local_key
    assert client_event.remote_salt == server_event.local_salt
    assert client_event.local_key != client_event.remote_key


@pytest.mark.parametrize(
    ("client_kind", "server_kind"),
    [("ecdsa", "ecdsa"), ("rsa", "ecdsa"), ("ecdsa", "rsa"), ("rsa", "rsa")],
)
def test_handshake_with_ecdsa_and_rsa_certificates(client_kind: str, server_kind: str) -> None:
    certificates = {
        "ecdsa": ecdsa_certificate("client" if client_kind == "ecdsa" else "server"),
        "rsa": rsa_certificate(),
    }
    client_certificate = certificates[client_kind]
    server_certificate = (
        ecdsa_certificate("server") if server_kind == "ecdsa" else rsa_certificate()
    )
    client, server = make_pair(
        client_certificate=client_certificate, server_certificate=server_certificate
    )
    datagrams = handshake(client, server)
    (client_event,) = events(client)
    (server_event,) = events(server)
    assert_mirrored(client_event, server_event)
    assert client_event.profile == SrtpProfile.AEAD_AES_128_GCM
    assert len(client_event.local_key) == 16 and len(client_event.local_salt) == 12
    # The server's certificate picks the suite family: ECDHE-RSA must be allowed.
    family = "ECDHE-RSA" if server_kind == "rsa" else "ECDHE-ECDSA"
    assert client.cipher_suite is not None and client.cipher_suite.startswith(family)
    assert all(len(datagram) <= DEFAULT_MTU for datagram in datagrams)
    assert client.is_connected and server.is_connected
    assert client.get_timer() is None


@functools.cache
def certificate_of(kind: str) -> DtlsCertificate:
    """A peer certificate of one key kind: the curves and RSA sizes real peers sign with
    (FFmpeg's GnuTLS WHIP muxer: P-224; browsers: P-256; GStreamer: RSA-2048)."""
    curves = {"P-224": ec.SECP224R1, "P-256": ec.SECP256R1, "P-384": ec.SECP384R1}
    if kind in curves:
        return DtlsCertificate.from_private_key(ec.generate_private_key(curves[kind]()))
    assert kind == "RSA-2048"
    return DtlsCertificate.from_private_key(
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )


PEER_KINDS = ["P-224", "P-256", "P-384", "RSA-2048"]


@pytest.mark.parametrize("peer_kind", PEER_KINDS)
@pytest.mark.parametrize("our_role", ["client", "server"])
def test_accepts_peer_certificates_on_every_curve_real_peers_use(
    our_role: str, peer_kind: str
) -> None:
    """whepfan's side (server certificate: P-256) against a peer signing with
    ``peer_kind``. As DTLS client (the peer offered a=setup:passive, as FFmpeg does) a
    P-224 server certificate used to fail with "wrong curve": the certificate's curve
    must be one of the client's supported_groups (RFC 8422 §5.1.1)."""
    ours, theirs = ecdsa_certificate("server"), certificate_of(peer_kind)
    if our_role == "client":
        client, server = make_pair(client_certificate=ours, server_certificate=theirs)
        whepfan = client
    else:
        client, server = make_pair(client_certificate=theirs, server_certificate=ours)
        whepfan = server
    handshake(client, server)
    (client_event,) = events(client)
    (server_event,) = events(server)
    assert_mirrored(client_event, server_event)
    # An ECDHE group both sides prefer, never the P-224 fallback between these two.
    assert whepfan.key_exchange_group == "x25519"
    family = "ECDHE-RSA" if peer_kind.startswith("RSA") and our_role == "client" else "ECDHE"
    assert whepfan.cipher_suite is not None and whepfan.cipher_suite.startswith(family)


@pytest.mark.parametrize("kind", PEER_KINDS)
def test_both_ends_on_the_same_certificate_kind(kind: str) -> None:
    client, server = make_pair(
        client_certificate=certificate_of(kind), server_certificate=certificate_of(kind)
    )
    handshake(client, server)
    (client_event,) = events(client)
    (server_event,) = events(server)
    assert_mirrored(client_event, server_event)


def _client_hello_extensions(datagram: bytes) -> dict[int, bytes]:
    """The extensions of the ClientHello in ``datagram`` (RFC 6347 §4.2.2 handshake
    header of 12 bytes after the 13-byte record header; RFC 5246 §7.4.1.2 body)."""
    assert datagram[0] == HANDSHAKE and datagram[13] == CLIENT_HELLO
    body = datagram[13 + 12 :]
    position = 2 + 32  # client_version, random
    position += 1 + body[position]  # session_id
    position += 1 + body[position]  # cookie (DTLS)
    position += 2 + struct.unpack_from("!H", body, position)[0]  # cipher_suites
    position += 1 + body[position]  # compression_methods
    end = position + 2 + struct.unpack_from("!H", body, position)[0]
    position += 2
    extensions = {}
    while position < end:
        kind, length = struct.unpack_from("!HH", body, position)
        extensions[kind] = body[position + 4 : position + 4 + length]
        position += 4 + length
    return extensions


def test_client_hello_offers_p224_after_the_modern_groups() -> None:
    """RFC 8422 §5.1.1 supported_groups (extension 10): x25519 (29), secp256r1 (23),
    secp384r1 (24), secp521r1 (25), x448 (30), then secp224r1 (21) for peers whose
    certificate is on it."""
    client, _ = make_pair()
    client.start(0.0)
    (hello,) = client.datagrams_to_send()
    groups_extension = _client_hello_extensions(hello)[10]
    (length,) = struct.unpack_from("!H", groups_extension)
    groups = list(struct.unpack_from(f"!{length // 2}H", groups_extension, 2))
    assert groups == [29, 23, 24, 25, 30, 21]


@pytest.mark.parametrize(
    ("client_profiles", "server_profiles", "expected"),
    [
        (None, None, SrtpProfile.AEAD_AES_128_GCM),
        ((SrtpProfile.AES128_CM_HMAC_SHA1_80,), None, SrtpProfile.AES128_CM_HMAC_SHA1_80),
        (None, (SrtpProfile.AES128_CM_HMAC_SHA1_80,), SrtpProfile.AES128_CM_HMAC_SHA1_80),
        ((SrtpProfile.AEAD_AES_256_GCM,), None, SrtpProfile.AEAD_AES_256_GCM),
        ((SrtpProfile.AES128_CM_HMAC_SHA1_32,), None, SrtpProfile.AES128_CM_HMAC_SHA1_32),
        # The server's preference wins when both offer several (RFC 5764 §4.1.1).
        ((1, 8, 7), (7, 8, 1), SrtpProfile.AEAD_AES_128_GCM),
    ],
)
def test_profile_negotiation(
    client_profiles: tuple[int, ...] | None,
    server_profiles: tuple[int, ...] | None,
    expected: SrtpProfile,
) -> None:
    client, server = make_pair(client_profiles=client_profiles, server_profiles=server_profiles)
    handshake(client, server)
    (client_event,) = events(client)
    (server_event,) = events(server)
    assert_mirrored(client_event, server_event)
    assert client_event.profile == expected
    key_length = 32 if expected == SrtpProfile.AEAD_AES_256_GCM else 16
    salt_length = 14 if expected in (1, 2) else 12
    assert len(client_event.local_key) == len(server_event.local_key) == key_length
    assert len(client_event.local_salt) == len(server_event.local_salt) == salt_length


def test_no_common_profile_fails_both_sides() -> None:
    client, server = make_pair(client_profiles=(1,), server_profiles=(7,))
    handshake(client, server)
    # RFC 5764 §4.1.1: the handshake itself succeeds without use_srtp; no keys follow.
    assert events(client) == [DtlsFailed("no SRTP protection profile in common")]
    assert events(server) == [DtlsFailed("no SRTP protection profile in common")]


def test_exported_keys_protect_srtp_both_ways_with_libsrtp() -> None:
    """The keys work as SRTP master keys: libsrtp (the oracle) on each side agrees."""
    for profile, libsrtp_profile in (
        (SrtpProfile.AEAD_AES_128_GCM, pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM),
        (SrtpProfile.AES128_CM_HMAC_SHA1_80, pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80),
    ):
        client, server = make_pair(client_profiles=(profile,))
        handshake(client, server)
        (client_event,) = events(client)
        (server_event,) = events(server)
        sender = pylibsrtp.Session(
            pylibsrtp.Policy(
                key=client_event.local_key + client_event.local_salt,
                ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
                srtp_profile=libsrtp_profile,
            )
        )
        receiver = pylibsrtp.Session(
            pylibsrtp.Policy(
                key=server_event.remote_key + server_event.remote_salt,
                ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
                srtp_profile=libsrtp_profile,
            )
        )
        rtp = struct.pack("!BBHII", 0x80, 96, 1, 3000, 0x12345678) + b"payload" * 10
        assert receiver.unprotect(sender.protect(rtp)) == rtp


def test_keying_material_split_follows_rfc5764_layout() -> None:
    # RFC 5764 §4.2: client key | server key | client salt | server salt.
    material = bytes(range(60))
    client_key, server_key, client_salt, server_salt = _split_keying_material(
        material, _ProfileParameters(b"SRTP_AES128_CM_SHA1_80", 16, 14)
    )
    assert client_key == bytes(range(16))
    assert server_key == bytes(range(16, 32))
    assert client_salt == bytes(range(32, 46))
    assert server_salt == bytes(range(46, 60))


@pytest.mark.parametrize("wrong_side", ["client", "server"])
def test_wrong_fingerprint_fails_that_side(wrong_side: str) -> None:
    impostor = [("sha-256", certificate_fingerprint(rsa_certificate().certificate, "sha-256"))]
    if wrong_side == "client":
        client, server = make_pair(client_expects=impostor)
        checking, other = client, server
    else:
        client, server = make_pair(server_expects=impostor)
        checking, other = server, client
    handshake(client, server)
    checking_events = events(checking)
    assert checking_events == [DtlsFailed("remote certificate does not match the SDP fingerprint")]
    assert checking.state == "failed"
    # The alert tells the other side, which fails as well and never keys.
    (other_event,) = events(other)
    assert isinstance(other_event, DtlsFailed)
    assert other_event.reason.startswith("handshake failed: ")


@pytest.mark.parametrize("algorithm", ["sha-1", "SHA-256", "sha-384", "sha-512"])
def test_fingerprint_algorithms_accepted(algorithm: str) -> None:
    server_certificate = ecdsa_certificate("server")
    value = certificate_fingerprint(server_certificate.certificate, algorithm).lower()
    client, server = make_pair(client_expects=[("md5", "00:11"), (algorithm, value)])
    handshake(client, server)
    assert isinstance(events(client)[0], DtlsConnected)


def test_only_unsupported_fingerprint_algorithm_fails() -> None:
    client, server = make_pair(client_expects=[("md5", "00:11:22")])
    handshake(client, server)
    assert events(client) == [DtlsFailed("remote certificate does not match the SDP fingerprint")]


def test_certificate_fingerprints_and_validity() -> None:
    certificate = ecdsa_certificate("server")
    ((algorithm, value),) = certificate.fingerprints
    assert algorithm == "sha-256"
    assert len(value) == 32 * 3 - 1 and value == value.upper()
    lifetime = certificate.expires - certificate.certificate.not_valid_before_utc
    assert lifetime.days == 31  # 30 days ahead, backdated one


def test_close_notify_reaches_the_peer() -> None:
    client, server = make_pair()
    handshake(client, server)
    events(client), events(server)
    client.close()
    assert client.state == "closed"
    pump(client, server)
    assert events(server) == [DtlsClosed()]
    assert server.state == "closed"
    assert events(client) == []


def test_garbage_and_stray_records_after_handshake_are_dropped() -> None:
    client, server = make_pair()
    handshake(client, server)
    events(client), events(server)
    for datagram in (
        b"",
        b"\x00",
        b"\x17\xfe\xfd" + bytes(10) + b"\x00\x05hello",  # application data, bad epoch/MAC
        b"\x16\xfe\xfd" + bytes(200),
        bytes(range(256)),
    ):
        server.receive(datagram, 1.0)
    assert events(server) == []
    assert server.is_connected


def test_garbage_before_client_hello_is_discarded() -> None:
    # RFC 6347 §4.1.2.7: invalid records are silently discarded, so noise on the
    # 5-tuple cannot kill a session that has not started its handshake.
    client, server = make_pair()
    server.receive(b"\x16\xfe\xfd" + bytes(200), 0.0)
    server.receive(bytes(range(50)), 0.0)
    assert events(server) == []
    assert server.datagrams_to_send() == []
    handshake(client, server)
    assert_mirrored(events(client)[0], events(server)[0])


def test_retransmits_a_dropped_flight_after_timer() -> None:
    # The one wall-clock wait: OpenSSL's DTLS timer (1 s initially, RFC 6347
    # §4.2.4.1) runs on its own clock, see the module docstring.
    client, server = make_pair()
    client.start(0.0)
    (first_hello,) = client.datagrams_to_send()  # dropped on the floor
    deadline = client.get_timer()
    assert deadline is not None and 0.0 < deadline <= 1.0
    time.sleep(deadline + 0.05)
    client.handle_timer(deadline)
    (retransmitted,) = client.datagrams_to_send()
    assert retransmitted[0] == HANDSHAKE and retransmitted[13] == CLIENT_HELLO
    assert retransmitted[13:] == first_hello[13:]  # same message, new record sequence
    rearmed = client.get_timer()
    assert rearmed is not None and rearmed > deadline
    server.start(deadline)
    server.receive(retransmitted, deadline)
    pump(client, server, deadline)
    assert_mirrored(events(client)[0], events(server)[0])


def test_pack_records_groups_whole_records_under_mtu() -> None:
    def record(length: int) -> bytes:
        return bytes([22, 0xFE, 0xFD]) + bytes(8) + struct.pack("!H", length) + bytes(length)

    stream = record(500) + record(500) + record(500) + record(10)
    datagrams = _pack_records(stream, 1200)
    assert [len(datagram) for datagram in datagrams] == [1026, 536]
    assert b"".join(datagrams) == stream


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        DtlsSession(certificate=ecdsa_certificate("server"), role="actpass", remote_fingerprints=[])
    with pytest.raises(ValueError):
        DtlsSession(
            certificate=ecdsa_certificate("server"),
            role="server",
            remote_fingerprints=[],
            profiles=(3,),
        )


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=400), max_size=4))
def test_fuzz_fresh_server_never_raises(datagrams: list[bytes]) -> None:
    _, server = make_pair()
    for datagram in datagrams:
        server.receive(datagram, 0.0)
    server.handle_timer(10.0)
    server.datagrams_to_send()
    assert all(isinstance(event, DtlsFailed) for event in events(server))


record_like = st.builds(
    lambda content_type, epoch, body: (
        bytes([content_type, 0xFE, 0xFD])
        + struct.pack("!H", epoch)
        + bytes(6)
        + struct.pack("!H", len(body))
        + body
    ),
    st.sampled_from([20, 21, 22, 23, 24]),
    st.integers(0, 2),
    st.binary(max_size=200),
)


@settings(max_examples=100)
@given(st.lists(record_like, min_size=1, max_size=4))
def test_fuzz_record_shaped_datagrams_never_raise(datagrams: list[bytes]) -> None:
    client, server = make_pair()
    handshake(client, server)
    _, fresh_server = make_pair()
    for datagram in datagrams:
        server.receive(datagram, 1.0)
        fresh_server.receive(datagram, 1.0)
    assert server.is_connected
    for event in events(fresh_server):
        assert isinstance(event, DtlsFailed)


def test_dropped_sessions_free_their_openssl_connections() -> None:
    """Each DtlsSession owns one SSL (and its BIOs) in the system libssl: dropping the
    session frees it, and the verify-callback registry does not keep sessions alive."""
    import gc

    from whepfan.protocol import _libssl

    gc.collect()
    before = len(_libssl._verifiers)
    pairs = [make_pair() for _ in range(20)]
    for client, server in pairs:
        handshake(client, server)
    assert len(_libssl._verifiers) == before + 40
    del pairs, client, server
    gc.collect()
    assert len(_libssl._verifiers) == before
