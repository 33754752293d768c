"""DTLS 1.2 (RFC 6347) with the DTLS-SRTP extension (RFC 5764), sans-IO.

Theory of operation
-------------------
Each WHIP/WHEP session runs one DTLS handshake over its ICE-selected address; its
only product is SRTP keying material. The system's OpenSSL 3 libssl (``_libssl``,
the library beside the compiled core's libcrypto; it says why not pyOpenSSL) does
the handshake on memory BIOs: ``receive`` writes a datagram into the read BIO and
drives the handshake, whatever OpenSSL wrote comes back as datagrams from
``datagrams_to_send``, and results are events from ``next_event``:

- ``DtlsConnected``: handshake done, peer certificate matches an SDP fingerprint
  (RFC 8122 §5), an SRTP profile was agreed (RFC 5764 §4.1.2), keys exported and
  split per RFC 5764 §4.2;
- ``DtlsFailed``: fingerprint mismatch, handshake error or no common profile;
- ``DtlsClosed``: the peer sent close_notify.

Roles come from SDP ``a=setup`` (RFC 8842 §5.5): "client" sends the ClientHello on
``start``. Certificates are self-signed and trusted only by fingerprint, so
OpenSSL's chain verdict is ignored and the leaf is pinned instead; a peer
certificate is required both ways (RFC 8827 §6.5). RSA and ECDSA peers are both
accepted: GStreamer's webrtcbin, for one, uses an RSA certificate.

Groups: an ECDSA peer's certificate must be on a curve in our supported_groups
(RFC 8422 §5.1.1; OpenSSL enforces it in TLS 1.2 as "wrong curve"), and so must the
ECDHE share a server picks. FFmpeg's WHIP muxer (GnuTLS) signs with P-224, so the
list goes past OpenSSL's default (X25519, P-256, X448, P-384, P-521) to P-224, last,
so it is only chosen for a key exchange when a peer offers nothing better.

Timer caveat: OpenSSL's DTLS retransmission timer (RFC 6347 §4.2.4) runs on its
own wall clock, not on ``now``. ``get_timer`` maps OpenSSL's remaining time onto
``now`` when each call returns; if ``handle_timer`` then runs before OpenSSL's
clock agrees (virtual time in tests), OpenSSL does nothing and the deadline is
re-armed from its remaining time. With ``now`` taken from a monotonic clock, as the
I/O driver does, the two agree.

Cookie exchange (HelloVerifyRequest, RFC 6347 §4.2.1) is not used: DTLS only
reaches a session from the address its ICE checks verified (RFC 8445 §7.3).
"""

from __future__ import annotations

import datetime
import enum
import secrets
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID

from whepfan.protocol import _libssl

# --- SRTP protection profiles -------------------------------------------------------


class SrtpProfile(enum.IntEnum):
    """IANA DTLS-SRTP protection profile ids (RFC 5764 §4.1.2, RFC 7714 §14.2)."""

    AES128_CM_HMAC_SHA1_80 = 0x0001
    AES128_CM_HMAC_SHA1_32 = 0x0002
    AEAD_AES_128_GCM = 0x0007
    AEAD_AES_256_GCM = 0x0008


@dataclass(frozen=True)
class _ProfileParameters:
    openssl_name: bytes
    key_length: int
    salt_length: int


# Master key and salt lengths: RFC 5764 §4.1.2 for AES-CM, RFC 7714 §12 for AEAD.
_PROFILE_PARAMETERS: dict[SrtpProfile, _ProfileParameters] = {
    SrtpProfile.AES128_CM_HMAC_SHA1_80: _ProfileParameters(b"SRTP_AES128_CM_SHA1_80", 16, 14),
    SrtpProfile.AES128_CM_HMAC_SHA1_32: _ProfileParameters(b"SRTP_AES128_CM_SHA1_32", 16, 14),
    SrtpProfile.AEAD_AES_128_GCM: _ProfileParameters(b"SRTP_AEAD_AES_128_GCM", 16, 12),
    SrtpProfile.AEAD_AES_256_GCM: _ProfileParameters(b"SRTP_AEAD_AES_256_GCM", 32, 12),
}
_PROFILE_BY_OPENSSL_NAME = {
    parameters.openssl_name: profile for profile, parameters in _PROFILE_PARAMETERS.items()
}

#: Our preference: GCM first (cheaper per packet in the compiled core, see DESIGN §4).
DEFAULT_SRTP_PROFILES: tuple[SrtpProfile, ...] = (
    SrtpProfile.AEAD_AES_128_GCM,
    SrtpProfile.AEAD_AES_256_GCM,
    SrtpProfile.AES128_CM_HMAC_SHA1_80,
    SrtpProfile.AES128_CM_HMAC_SHA1_32,
)

# ECDHE with either certificate type: the server's certificate picks the family.
# CBC suites stay for older peers; nothing without forward secrecy.
_CIPHER_LIST = b":".join(
    [
        b"ECDHE-ECDSA-AES128-GCM-SHA256",
        b"ECDHE-RSA-AES128-GCM-SHA256",
        b"ECDHE-ECDSA-AES256-GCM-SHA384",
        b"ECDHE-RSA-AES256-GCM-SHA384",
        b"ECDHE-ECDSA-CHACHA20-POLY1305",
        b"ECDHE-RSA-CHACHA20-POLY1305",
        b"ECDHE-ECDSA-AES128-SHA",
        b"ECDHE-RSA-AES128-SHA",
        b"ECDHE-ECDSA-AES256-SHA",
        b"ECDHE-RSA-AES256-SHA",
    ]
)

# RFC 8422 §5.1.1 named groups, in our order of preference (see the module docstring).
_GROUPS_LIST = b"X25519:P-256:P-384:P-521:X448:P-224"

_DTLS1_2_VERSION = 0xFEFD
#: RFC 5764 §4.2 exporter label.
_EXPORTER_LABEL = b"EXTRACTOR-dtls_srtp"
#: UDP payload budget for a flight: safe on any path (also Chromium's choice, 1200).
DEFAULT_MTU = 1200
_RECORD_HEADER_LENGTH = 13

# Fingerprint hash functions accepted in SDP a=fingerprint (RFC 8122 §5).
_FINGERPRINT_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha-1": hashes.SHA1,
    "sha-224": hashes.SHA224,
    "sha-256": hashes.SHA256,
    "sha-384": hashes.SHA384,
    "sha-512": hashes.SHA512,
}


def certificate_fingerprint(certificate: x509.Certificate, algorithm: str) -> str:
    """The SDP form of a fingerprint: upper-case hex pairs joined by colons (RFC 8122 §5)."""
    digest = certificate.fingerprint(_FINGERPRINT_HASHES[algorithm.lower()]())
    return digest.hex(":").upper()


# --- certificate --------------------------------------------------------------------

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class DtlsCertificate:
    """The server's self-signed DTLS certificate (one per server, shared by sessions).

    Peers trust it only through the SDP fingerprint, so the subject is a random name.
    The libssl context is built once per profile list and shared by every session.
    """

    VALIDITY = datetime.timedelta(days=30)

    def __init__(self, *, private_key: PrivateKey, certificate: x509.Certificate) -> None:
        self.private_key = private_key
        self.certificate = certificate
        self._contexts: dict[tuple[SrtpProfile, ...], _libssl.Context] = {}

    @classmethod
    def generate(cls, *, now: datetime.datetime | None = None) -> DtlsCertificate:
        """A fresh ECDSA P-256 key and certificate, the WebRTC default (RFC 8827 §6.5)."""
        return cls.from_private_key(ec.generate_private_key(ec.SECP256R1()), now=now)

    @classmethod
    def from_private_key(
        cls, private_key: PrivateKey, *, now: datetime.datetime | None = None
    ) -> DtlsCertificate:
        """Self-sign ``private_key`` (ECDSA or RSA), valid for 30 days from ``now``
        (backdated a day for peers with a slow clock)."""
        issued_at = now or datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, secrets.token_hex(8))])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(private_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(issued_at - datetime.timedelta(days=1))
            .not_valid_after(issued_at + cls.VALIDITY)
            .sign(private_key, hashes.SHA256())
        )
        return cls(private_key=private_key, certificate=certificate)

    @property
    def expires(self) -> datetime.datetime:
        return self.certificate.not_valid_after_utc

    @property
    def fingerprints(self) -> list[tuple[str, str]]:
        """[(algorithm, value)] for SDP a=fingerprint; SHA-256 is mandatory (RFC 8122 §5)."""
        return [("sha-256", certificate_fingerprint(self.certificate, "sha-256"))]

    def ssl_context(self, profiles: tuple[SrtpProfile, ...]) -> _libssl.Context:
        context = self._contexts.get(profiles)
        if context is None:
            context = self._contexts[profiles] = self._build_context(profiles)
        return context

    def _build_context(self, profiles: tuple[SrtpProfile, ...]) -> _libssl.Context:
        # RFC 8827 §6.5: DTLS 1.2 or later. No tickets and no session cache (in
        # _libssl.Context): a resumed session would skip the certificate we pin. The
        # peer certificate is required both ways and pinned by DtlsSession's verify.
        return _libssl.Context(
            certificate_der=self.certificate.public_bytes(Encoding.DER),
            private_key_der=self.private_key.private_bytes(
                Encoding.DER, PrivateFormat.PKCS8, NoEncryption()
            ),
            ciphers=_CIPHER_LIST,
            groups=_GROUPS_LIST,
            # OpenSSL's default signature algorithms already pair ECDSA with SHA-224..512
            # on any curve in TLS 1.2 (RFC 5246 §7.4.1.4.1; the curve binding of
            # ecdsa_secp256r1_sha256 is TLS 1.3 only, RFC 8446 §4.2.3), and RSA
            # PKCS#1 / PSS: P-224 and RSA peers sign with those, so no list is set.
            sigalgs=None,
            # RFC 5764 §4.1.1: offered in our order of preference; an OpenSSL server
            # picks the first of its own profiles that the client offered.
            srtp_profiles=b":".join(
                _PROFILE_PARAMETERS[profile].openssl_name for profile in profiles
            ),
            min_version=_DTLS1_2_VERSION,
        )


# --- events -------------------------------------------------------------------------


@dataclass(frozen=True)
class DtlsConnected:
    """Handshake complete. ``profile`` is the IANA id (SrtpProfile); keys are ours
    (``local_*``, to protect what we send) and the peer's (``remote_*``)."""

    profile: int
    local_key: bytes
    local_salt: bytes
    remote_key: bytes
    remote_salt: bytes


@dataclass(frozen=True)
class DtlsFailed:
    reason: str


@dataclass(frozen=True)
class DtlsClosed:
    """The peer sent close_notify (RFC 5246 §7.2.1)."""


DtlsEvent = DtlsConnected | DtlsFailed | DtlsClosed


class _State(enum.Enum):
    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    FAILED = "failed"
    CLOSED = "closed"


# --- session ------------------------------------------------------------------------


def _split_keying_material(
    material: bytes, parameters: _ProfileParameters
) -> tuple[bytes, bytes, bytes, bytes]:
    """RFC 5764 §4.2: the exporter output is laid out as

        client_write_SRTP_master_key[key_length]
        server_write_SRTP_master_key[key_length]
        client_write_SRTP_master_salt[salt_length]
        server_write_SRTP_master_salt[salt_length]

    Returns (client_key, server_key, client_salt, server_salt).
    """
    key_length, salt_length = parameters.key_length, parameters.salt_length
    client_key = material[:key_length]
    server_key = material[key_length : 2 * key_length]
    salts = material[2 * key_length :]
    return client_key, server_key, salts[:salt_length], salts[salt_length : 2 * salt_length]


def _pack_records(data: bytes, mtu: int) -> list[bytes]:
    """Cut OpenSSL's output into datagrams of whole records, each at most ``mtu``.

    A memory BIO is a byte stream, so the datagram boundaries OpenSSL meant are lost;
    records are self-delimiting (RFC 6347 §4.1: 13-byte header ending in a 16-bit
    length) and several may share a datagram (§4.1.1), so they are regrouped here.

        +------+---------+-------+-----------------+--------+----------+
        | type | version | epoch | sequence_number | length | fragment |
        |  1   |    2    |   2   |        6        |   2    |  length  |
        +------+---------+-------+-----------------+--------+----------+
    """
    datagrams: list[bytes] = []
    current = bytearray()
    position = 0
    while position < len(data):
        if position + _RECORD_HEADER_LENGTH > len(data):
            record = data[position:]
        else:
            (length,) = struct.unpack_from("!H", data, position + 11)
            record = data[position : position + _RECORD_HEADER_LENGTH + length]
        position += len(record)
        if current and len(current) + len(record) > mtu:
            datagrams.append(bytes(current))
            current = bytearray()
        current += record
    if current:
        datagrams.append(bytes(current))
    return datagrams


def _describe(error: Exception) -> str:
    """OpenSSL's error queue as one line: the reason strings of each entry."""
    return str(error) or type(error).__name__


class DtlsSession:
    """One DTLS-SRTP association, driven by datagrams and ``now``."""

    def __init__(
        self,
        *,
        certificate: DtlsCertificate,
        role: str,
        remote_fingerprints: Iterable[tuple[str, str]],
        profiles: Sequence[int] = DEFAULT_SRTP_PROFILES,
        mtu: int = DEFAULT_MTU,
    ) -> None:
        if role not in ("client", "server"):
            raise ValueError(f"DTLS role must be 'client' or 'server', not {role!r}")
        self.role = role
        self._profiles = tuple(SrtpProfile(profile) for profile in profiles)
        if not self._profiles:
            raise ValueError("at least one SRTP profile is required")
        self._remote_fingerprints = [
            (algorithm.lower(), value.upper()) for algorithm, value in remote_fingerprints
        ]
        self._mtu = mtu
        self._ssl = _libssl.Connection(
            certificate.ssl_context(self._profiles),
            client=role == "client",
            mtu=mtu,
            verify=self._verify_peer_certificate,
        )
        self._state = _State.NEW
        self._certificate_rejected = False
        self._outgoing: list[bytes] = []
        self._events: deque[DtlsEvent] = deque()
        self._timer_deadline: float | None = None
        self.application_data_dropped = 0

    @property
    def state(self) -> str:
        return self._state.value

    @property
    def is_connected(self) -> bool:
        return self._state is _State.CONNECTED

    @property
    def cipher_suite(self) -> str | None:
        """OpenSSL's name of the negotiated cipher suite, once there is one."""
        return self._ssl.cipher_name

    @property
    def key_exchange_group(self) -> str | None:
        """The ECDHE group of the handshake (e.g. "x25519"), once there is one."""
        return self._ssl.group_name

    # -- input --------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Begin the handshake: a client sends its ClientHello, a server waits for one."""
        if self._state is not _State.NEW:
            return
        self._state = _State.CONNECTING
        if self.role == "client":
            self._continue_handshake()
        self._after_io(now)

    def receive(self, data: bytes, now: float) -> None:
        """One datagram from the peer. Never raises: failures become events."""
        if self._state is _State.NEW:
            if self.role == "client":
                return  # nothing can precede our ClientHello
            self._state = _State.CONNECTING
        if not data or self._state not in (_State.CONNECTING, _State.CONNECTED):
            return
        self._ssl.write_incoming(data)
        if self._state is _State.CONNECTING:
            self._continue_handshake()
        if self._state is _State.CONNECTED:
            self._read_records()
        self._after_io(now)

    def handle_timer(self, now: float) -> None:
        """Retransmit the last flight if OpenSSL's timer has run out (RFC 6347 §4.2.4)."""
        if self._timer_deadline is None or now < self._timer_deadline:
            return
        if self._state in (_State.CONNECTING, _State.CONNECTED):
            try:
                self._ssl.handle_timeout()
            except _libssl.LibsslError as error:
                # OpenSSL gives up after repeated timeouts of the same flight.
                self._fail(f"handshake timed out: {_describe(error)}")
        self._after_io(now)

    def close(self) -> None:
        """Queue close_notify (RFC 5246 §7.2.1) and stop; no event is emitted."""
        if self._state is _State.CONNECTED:
            # shutdown() only queues the alert into the memory BIO; the peer's answer
            # is never awaited (RFC 5246 §7.2.1 allows closing without it).
            self._ssl.shutdown()
            self._flush()
        if self._state in (_State.NEW, _State.CONNECTING, _State.CONNECTED):
            self._state = _State.CLOSED
        self._timer_deadline = None

    # -- output -------------------------------------------------------------------

    def datagrams_to_send(self) -> list[bytes]:
        datagrams, self._outgoing = self._outgoing, []
        return datagrams

    def next_event(self) -> DtlsEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        return self._timer_deadline

    # -- internals ----------------------------------------------------------------

    def _continue_handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except _libssl.WantRead:
            return
        except (_libssl.LibsslError, _libssl.Closed) as error:
            if self._certificate_rejected:
                self._fail("remote certificate does not match the SDP fingerprint")
            else:
                self._fail(f"handshake failed: {_describe(error)}")
            return
        self._on_handshake_complete()

    def _on_handshake_complete(self) -> None:
        der = self._ssl.peer_certificate_der()
        # The verify callback pinned the certificate already; checking again here
        # keeps the guarantee even if OpenSSL ever skips the callback.
        if der is None or not self._verify_peer_certificate(der, 0):
            self._fail("remote certificate does not match the SDP fingerprint")
            return
        selected = self._ssl.selected_srtp_profile()
        profile = _PROFILE_BY_OPENSSL_NAME.get(selected.encode()) if selected else None
        if profile is None:
            # RFC 5764 §4.1.1: without a common profile there is no DTLS-SRTP.
            self._fail("no SRTP protection profile in common")
            return
        parameters = _PROFILE_PARAMETERS[profile]
        material = self._ssl.export_keying_material(
            _EXPORTER_LABEL, 2 * (parameters.key_length + parameters.salt_length)
        )
        client_key, server_key, client_salt, server_salt = _split_keying_material(
            material, parameters
        )
        if self.role == "client":
            local_key, local_salt, remote_key, remote_salt = (
                client_key,
                client_salt,
                server_key,
                server_salt,
            )
        else:
            local_key, local_salt, remote_key, remote_salt = (
                server_key,
                server_salt,
                client_key,
                client_salt,
            )
        self._state = _State.CONNECTED
        self._events.append(
            DtlsConnected(
                profile=profile,
                local_key=local_key,
                local_salt=local_salt,
                remote_key=remote_key,
                remote_salt=remote_salt,
            )
        )

    def _read_records(self) -> None:
        """Read past the handshake: OpenSSL answers retransmitted flights itself;
        close_notify ends the session; application data (whepfan carries no data
        channels) and undecryptable records are dropped (RFC 6347 §4.1.2.7)."""
        while True:
            try:
                self._ssl.read()
            except _libssl.WantRead:
                return
            except _libssl.Closed:
                self._state = _State.CLOSED
                self._events.append(DtlsClosed())
                return
            except _libssl.LibsslError:
                return
            self.application_data_dropped += 1

    def _verify_peer_certificate(self, der: bytes, depth: int) -> bool:
        """OpenSSL's verify callback: pin the leaf to the SDP fingerprints.

        The chain verdict is ignored: WebRTC certificates are self-signed and
        authenticated by the signalled fingerprint alone (RFC 8122 §5); certificates
        above the leaf carry no weight. False aborts the handshake with an alert.
        """
        if depth != 0:
            return True
        try:
            certificate = x509.load_der_x509_certificate(der)
        except (ValueError, x509.InvalidVersion):
            # DER that OpenSSL takes but cryptography's stricter parser refuses (a
            # malformed UTCTime, RFC 5280 §4.1.2.5.1; a version other than v1..v3,
            # §4.1.2.1): abort with an alert, as for a mismatch.
            self._certificate_rejected = True
            return False
        return self._accepts_certificate(certificate)

    def _accepts_certificate(self, certificate: x509.Certificate) -> bool:
        """RFC 8122 §5: the certificate must match a signalled fingerprint of a hash
        function we support."""
        for algorithm, value in self._remote_fingerprints:
            if algorithm in _FINGERPRINT_HASHES and (
                certificate_fingerprint(certificate, algorithm) == value
            ):
                return True
        self._certificate_rejected = True
        return False

    def _fail(self, reason: str) -> None:
        self._state = _State.FAILED
        self._events.append(DtlsFailed(reason))

    def _flush(self) -> None:
        data = self._ssl.read_outgoing()
        if data:
            self._outgoing.extend(_pack_records(data, self._mtu))

    def _after_io(self, now: float) -> None:
        # Alerts written on failure still go out, so the peer learns why.
        self._flush()
        if self._state in (_State.CONNECTING, _State.CONNECTED):
            remaining = self._ssl.get_timeout()
            self._timer_deadline = None if remaining is None else now + remaining
        else:
            self._timer_deadline = None
