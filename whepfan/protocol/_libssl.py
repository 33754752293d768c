"""The system's OpenSSL 3 libssl through ctypes: the DTLS engine under ``dtls.py``.

Why not pyOpenSSL: pyOpenSSL runs on the OpenSSL that ``cryptography`` bundles in its
wheel, and from cryptography 47 that is OpenSSL 4, built without the "deprecated" TLS
groups of RFC 8422 §5.1.1 (P-224 among them). OpenSSL's TLS 1.2 code checks that an
ECDSA peer certificate is on one of our supported groups (``tls12_check_peer_sigalg``),
so such a libssl refuses every P-224 peer with "wrong curve", whatever groups list is
set: FFmpeg's WHIP muxer (GnuTLS) signs with a P-224 certificate. whepfan's compiled
core already links the system's ``libcrypto.so.3`` (``_fastpath``), so the DTLS layer
takes its ``libssl.so.3`` beside it, where every RFC 8422 group can be enabled.

Only what ``dtls.py`` needs is declared: a context, a connection on two memory BIOs,
the handshake, the DTLS timer, the SRTP extension (RFC 5764) and the exporter. Every
call is made with the GIL released (``ctypes.CDLL``); the certificate verify callback
takes it back. Nothing here does I/O.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["Closed", "Connection", "Context", "LibsslError", "WantRead"]


def _load(names: tuple[str, ...]) -> ctypes.CDLL:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    found = ctypes.util.find_library(names[0].split(".")[0].removeprefix("lib"))
    if found is None:
        raise ImportError(
            f"whepfan's DTLS needs the system OpenSSL 3 library ({names[0]}): "
            "install libssl3 (Debian/Ubuntu) or openssl-libs (Fedora)"
        )
    return ctypes.CDLL(found)


_ssl = _load(("libssl.so.3", "libssl.3.dylib"))
_crypto = _load(("libcrypto.so.3", "libcrypto.3.dylib"))

_p = ctypes.c_void_p
_int, _long, _size = ctypes.c_int, ctypes.c_long, ctypes.c_size_t


def _declare(library: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Any:
    function = getattr(library, name)
    function.restype = restype
    function.argtypes = list(argtypes)
    return function


class _SrtpProtectionProfile(ctypes.Structure):
    _fields_ = (("name", ctypes.c_char_p), ("id", ctypes.c_ulong))


class _Timeval(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long))


# int verify_callback(int preverify_ok, X509_STORE_CTX *ctx)
_VERIFY_CALLBACK = ctypes.CFUNCTYPE(_int, _int, _p)

DTLS_method = _declare(_ssl, "DTLS_method", _p)
SSL_CTX_new = _declare(_ssl, "SSL_CTX_new", _p, _p)
SSL_CTX_free = _declare(_ssl, "SSL_CTX_free", None, _p)
SSL_CTX_ctrl = _declare(_ssl, "SSL_CTX_ctrl", _long, _p, _int, _long, _p)
SSL_CTX_set_options = _declare(_ssl, "SSL_CTX_set_options", ctypes.c_uint64, _p, ctypes.c_uint64)
SSL_CTX_set_verify = _declare(_ssl, "SSL_CTX_set_verify", None, _p, _int, _VERIFY_CALLBACK)
SSL_CTX_use_certificate = _declare(_ssl, "SSL_CTX_use_certificate", _int, _p, _p)
SSL_CTX_use_PrivateKey = _declare(_ssl, "SSL_CTX_use_PrivateKey", _int, _p, _p)
SSL_CTX_check_private_key = _declare(_ssl, "SSL_CTX_check_private_key", _int, _p)
SSL_CTX_set_cipher_list = _declare(_ssl, "SSL_CTX_set_cipher_list", _int, _p, ctypes.c_char_p)
SSL_CTX_set_tlsext_use_srtp = _declare(
    _ssl, "SSL_CTX_set_tlsext_use_srtp", _int, _p, ctypes.c_char_p
)
SSL_new = _declare(_ssl, "SSL_new", _p, _p)
SSL_free = _declare(_ssl, "SSL_free", None, _p)
SSL_ctrl = _declare(_ssl, "SSL_ctrl", _long, _p, _int, _long, _p)
SSL_set_bio = _declare(_ssl, "SSL_set_bio", None, _p, _p, _p)
SSL_set_connect_state = _declare(_ssl, "SSL_set_connect_state", None, _p)
SSL_set_accept_state = _declare(_ssl, "SSL_set_accept_state", None, _p)
SSL_do_handshake = _declare(_ssl, "SSL_do_handshake", _int, _p)
SSL_read = _declare(_ssl, "SSL_read", _int, _p, ctypes.c_char_p, _int)
SSL_shutdown = _declare(_ssl, "SSL_shutdown", _int, _p)
SSL_get_error = _declare(_ssl, "SSL_get_error", _int, _p, _int)
SSL_get_current_cipher = _declare(_ssl, "SSL_get_current_cipher", _p, _p)
SSL_CIPHER_get_name = _declare(_ssl, "SSL_CIPHER_get_name", ctypes.c_char_p, _p)
SSL_group_to_name = _declare(_ssl, "SSL_group_to_name", ctypes.c_char_p, _p, _int)
SSL_get1_peer_certificate = _declare(_ssl, "SSL_get1_peer_certificate", _p, _p)
SSL_get_selected_srtp_profile = _declare(
    _ssl, "SSL_get_selected_srtp_profile", ctypes.POINTER(_SrtpProtectionProfile), _p
)
SSL_export_keying_material = _declare(
    _ssl,
    "SSL_export_keying_material",
    _int,
    _p,
    ctypes.c_char_p,
    _size,
    ctypes.c_char_p,
    _size,
    ctypes.c_char_p,
    _size,
    _int,
)
SSL_get_ex_data_X509_STORE_CTX_idx = _declare(_ssl, "SSL_get_ex_data_X509_STORE_CTX_idx", _int)
X509_STORE_CTX_get_ex_data = _declare(_crypto, "X509_STORE_CTX_get_ex_data", _p, _p, _int)
X509_STORE_CTX_get_current_cert = _declare(_crypto, "X509_STORE_CTX_get_current_cert", _p, _p)
X509_STORE_CTX_get_error_depth = _declare(_crypto, "X509_STORE_CTX_get_error_depth", _int, _p)
BIO_s_mem = _declare(_crypto, "BIO_s_mem", _p)
BIO_new = _declare(_crypto, "BIO_new", _p, _p)
BIO_write = _declare(_crypto, "BIO_write", _int, _p, ctypes.c_char_p, _int)
BIO_read = _declare(_crypto, "BIO_read", _int, _p, ctypes.c_char_p, _int)
BIO_ctrl_pending = _declare(_crypto, "BIO_ctrl_pending", _size, _p)
d2i_X509 = _declare(_crypto, "d2i_X509", _p, _p, ctypes.POINTER(ctypes.c_char_p), _long)
i2d_X509 = _declare(_crypto, "i2d_X509", _int, _p, ctypes.POINTER(ctypes.c_char_p))
X509_free = _declare(_crypto, "X509_free", None, _p)
d2i_AutoPrivateKey = _declare(
    _crypto, "d2i_AutoPrivateKey", _p, _p, ctypes.POINTER(ctypes.c_char_p), _long
)
EVP_PKEY_free = _declare(_crypto, "EVP_PKEY_free", None, _p)
ERR_get_error = _declare(_crypto, "ERR_get_error", ctypes.c_ulong)
ERR_clear_error = _declare(_crypto, "ERR_clear_error", None)
ERR_error_string_n = _declare(
    _crypto, "ERR_error_string_n", None, ctypes.c_ulong, ctypes.c_char_p, _size
)
ERR_reason_error_string = _declare(_crypto, "ERR_reason_error_string", ctypes.c_char_p, _p)
OpenSSL_version = _declare(_crypto, "OpenSSL_version", ctypes.c_char_p, _int)

# ssl.h (OpenSSL 3.0): control codes and flags behind the SSL_*ctrl macros.
_SSL_CTRL_SET_MTU = 17
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_DTLS_CTRL_GET_TIMEOUT = 73
_DTLS_CTRL_HANDLE_TIMEOUT = 74
_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_CTRL_SET_SIGALGS_LIST = 98
_SSL_CTRL_SET_CLIENT_SIGALGS_LIST = 102
_SSL_CTRL_SET_MIN_PROTO_VERSION = 123
_SSL_CTRL_GET_NEGOTIATED_GROUP = 134
SSL_OP_NO_QUERY_MTU = 1 << 12
SSL_OP_NO_TICKET = 1 << 14
SSL_VERIFY_PEER = 0x01
SSL_VERIFY_FAIL_IF_NO_PEER_CERT = 0x02
SSL_SESS_CACHE_OFF = 0
_SSL_ERROR_SSL = 1
_SSL_ERROR_WANT_READ = 2
_SSL_ERROR_ZERO_RETURN = 6

VERSION = (OpenSSL_version(0) or b"").decode()


class LibsslError(Exception):
    """An OpenSSL call failed; the message is its error queue, reasons joined by "; "."""


class WantRead(Exception):
    """The connection needs the peer's next datagram (SSL_ERROR_WANT_READ)."""


class Closed(Exception):
    """The peer sent close_notify (SSL_ERROR_ZERO_RETURN)."""


def _error_queue() -> str:
    reasons = []
    while code := ERR_get_error():
        reason = ERR_reason_error_string(code)
        if reason is None:
            buffer = ctypes.create_string_buffer(256)
            ERR_error_string_n(code, buffer, len(buffer))
            reason = buffer.value
        reasons.append(reason.decode(errors="replace"))
    return "; ".join(reasons)


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise LibsslError(f"{what}: {_error_queue() or 'failed'}")


def _der_pointer(der: bytes) -> ctypes._Pointer[ctypes.c_char_p]:
    return ctypes.pointer(ctypes.c_char_p(der))


def _x509_to_der(x509: int) -> bytes:
    length = i2d_X509(x509, None)
    _check(length > 0, "i2d_X509")
    buffer = ctypes.create_string_buffer(length)
    cursor = ctypes.c_char_p(ctypes.addressof(buffer))
    i2d_X509(x509, ctypes.pointer(cursor))
    return buffer.raw


# SSL* address -> the verify method of its Connection's owner, held weakly (a strong
# reference here would keep every session alive): OpenSSL's callback carries no user
# pointer of ours, only the SSL* behind the X509_STORE_CTX.
_verifiers: dict[int, weakref.WeakMethod[Callable[[bytes, int], bool]]] = {}


@_VERIFY_CALLBACK
def _verify_callback(preverify_ok: int, store: int) -> int:
    # Returning 0 aborts the handshake with an alert; nothing may raise out of a
    # ctypes callback (ctypes would print it and return 0 anyway).
    try:
        ssl = X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx())
        reference = _verifiers.get(ssl or 0)
        verify = reference() if reference is not None else None
        certificate = X509_STORE_CTX_get_current_cert(store)
        if verify is None or not certificate:
            return 0
        depth = X509_STORE_CTX_get_error_depth(store)
        return 1 if verify(_x509_to_der(certificate), depth) else 0
    except Exception:
        return 0


class Context:
    """An SSL_CTX for DTLS: certificate, key, cipher/group/sigalg lists, SRTP profiles.

    ``verify`` gets each peer certificate in the chain (DER, depth) and decides alone:
    OpenSSL's own chain verdict is ignored (``dtls.py`` pins by fingerprint).
    """

    def __init__(
        self,
        *,
        certificate_der: bytes,
        private_key_der: bytes,
        ciphers: bytes,
        groups: bytes,
        sigalgs: bytes | None,
        srtp_profiles: bytes,
        min_version: int,
    ) -> None:
        ERR_clear_error()
        context = SSL_CTX_new(DTLS_method())
        _check(bool(context), "SSL_CTX_new")
        self._context: int = context
        self._finalizer = weakref.finalize(self, SSL_CTX_free, context)
        _check(
            SSL_CTX_ctrl(context, _SSL_CTRL_SET_MIN_PROTO_VERSION, min_version, None) == 1,
            "minimum protocol version",
        )
        SSL_CTX_set_options(context, SSL_OP_NO_TICKET | SSL_OP_NO_QUERY_MTU)
        SSL_CTX_ctrl(context, _SSL_CTRL_SET_SESS_CACHE_MODE, SSL_SESS_CACHE_OFF, None)
        SSL_CTX_set_verify(
            context, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, _verify_callback
        )
        x509 = d2i_X509(None, _der_pointer(certificate_der), len(certificate_der))
        _check(bool(x509), "certificate")
        try:
            _check(SSL_CTX_use_certificate(context, x509) == 1, "use certificate")
        finally:
            X509_free(x509)  # the context holds its own reference
        key = d2i_AutoPrivateKey(None, _der_pointer(private_key_der), len(private_key_der))
        _check(bool(key), "private key")
        try:
            _check(SSL_CTX_use_PrivateKey(context, key) == 1, "use private key")
        finally:
            EVP_PKEY_free(key)
        _check(SSL_CTX_check_private_key(context) == 1, "key does not match certificate")
        _check(SSL_CTX_set_cipher_list(context, ciphers) == 1, "cipher list")
        _check(
            SSL_CTX_ctrl(context, _SSL_CTRL_SET_GROUPS_LIST, 0, ctypes.c_char_p(groups)) == 1,
            f"groups list {groups.decode()}",
        )
        if sigalgs is not None:
            for control in (_SSL_CTRL_SET_SIGALGS_LIST, _SSL_CTRL_SET_CLIENT_SIGALGS_LIST):
                _check(
                    SSL_CTX_ctrl(context, control, 0, ctypes.c_char_p(sigalgs)) == 1,
                    f"signature algorithms {sigalgs.decode()}",
                )
        # Unlike most of OpenSSL, 0 is success here.
        _check(SSL_CTX_set_tlsext_use_srtp(context, srtp_profiles) == 0, "SRTP profiles")


class Connection:
    """One SSL on a read and a write memory BIO (freed with the SSL)."""

    def __init__(
        self,
        context: Context,
        *,
        client: bool,
        mtu: int,
        verify: Callable[[bytes, int], bool],
    ) -> None:
        """``verify`` is a bound method, kept weakly; its owner keeps the Connection."""
        ssl = SSL_new(context._context)
        _check(bool(ssl), "SSL_new")
        self._ssl: int = ssl
        self._context = context  # the SSL holds a reference too; keep ours for order
        self._read_bio = BIO_new(BIO_s_mem())
        self._write_bio = BIO_new(BIO_s_mem())
        _check(bool(self._read_bio and self._write_bio), "BIO_new")
        SSL_set_bio(ssl, self._read_bio, self._write_bio)
        _verifiers[ssl] = weakref.WeakMethod(verify)
        self._finalizer = weakref.finalize(self, _free_connection, ssl)
        SSL_ctrl(ssl, _SSL_CTRL_SET_MTU, mtu, None)
        if client:
            SSL_set_connect_state(ssl)
        else:
            SSL_set_accept_state(ssl)

    def _raise_for(self, result: int, what: str) -> None:
        error = SSL_get_error(self._ssl, result)
        if error == _SSL_ERROR_WANT_READ:
            ERR_clear_error()
            raise WantRead
        if error == _SSL_ERROR_ZERO_RETURN:
            raise Closed
        raise LibsslError(_error_queue() or f"{what} failed (SSL_get_error {error})")

    def do_handshake(self) -> None:
        """Advance the handshake; WantRead until the peer's next flight, LibsslError
        when it failed."""
        ERR_clear_error()
        result = SSL_do_handshake(self._ssl)
        if result != 1:
            self._raise_for(result, "handshake")

    def read(self) -> bytes:
        """One application-data record; WantRead when none is buffered, Closed on
        close_notify, LibsslError for a record OpenSSL rejects."""
        ERR_clear_error()
        buffer = ctypes.create_string_buffer(65536)
        result = SSL_read(self._ssl, buffer, len(buffer))
        if result <= 0:
            self._raise_for(result, "read")
        return buffer.raw[:result]

    def shutdown(self) -> None:
        """Queue close_notify (its answer is never awaited)."""
        ERR_clear_error()
        SSL_shutdown(self._ssl)
        ERR_clear_error()

    def write_incoming(self, data: bytes) -> None:
        BIO_write(self._read_bio, data, len(data))

    def read_outgoing(self) -> bytes:
        pending = BIO_ctrl_pending(self._write_bio)
        if not pending:
            return b""
        buffer = ctypes.create_string_buffer(pending)
        count = BIO_read(self._write_bio, buffer, pending)
        return buffer.raw[: max(count, 0)]

    def get_timeout(self) -> float | None:
        """Seconds left on the DTLS retransmission timer (RFC 6347 §4.2.4), or None."""
        timeval = _Timeval()
        if SSL_ctrl(self._ssl, _DTLS_CTRL_GET_TIMEOUT, 0, ctypes.byref(timeval)) != 1:
            return None
        return timeval.tv_sec + timeval.tv_usec / 1e6

    def handle_timeout(self) -> None:
        """Retransmit if the timer ran out; LibsslError once OpenSSL gives up."""
        ERR_clear_error()
        if SSL_ctrl(self._ssl, _DTLS_CTRL_HANDLE_TIMEOUT, 0, None) < 0:
            raise LibsslError(_error_queue() or "too many retransmissions")

    @property
    def cipher_name(self) -> str | None:
        cipher = SSL_get_current_cipher(self._ssl)
        name = SSL_CIPHER_get_name(cipher) if cipher else None
        return name.decode() if name else None

    @property
    def group_name(self) -> str | None:
        """The key-exchange group (TLS 1.2: the ECDHE curve of ServerKeyExchange)."""
        group = SSL_ctrl(self._ssl, _SSL_CTRL_GET_NEGOTIATED_GROUP, 0, None)
        name = SSL_group_to_name(self._ssl, group) if group > 0 else None
        return name.decode() if name else None

    def peer_certificate_der(self) -> bytes | None:
        x509 = SSL_get1_peer_certificate(self._ssl)
        if not x509:
            return None
        try:
            return _x509_to_der(x509)
        finally:
            X509_free(x509)

    def selected_srtp_profile(self) -> str | None:
        profile = SSL_get_selected_srtp_profile(self._ssl)
        return profile.contents.name.decode() if profile and profile.contents.name else None

    def export_keying_material(self, label: bytes, length: int) -> bytes:
        out = ctypes.create_string_buffer(length)
        ok = SSL_export_keying_material(self._ssl, out, length, label, len(label), None, 0, 0)
        _check(ok == 1, "export keying material")
        return out.raw


def _free_connection(ssl: int) -> None:
    _verifiers.pop(ssl, None)
    SSL_free(ssl)
