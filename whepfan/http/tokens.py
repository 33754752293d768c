"""Scoped bearer tokens: what a credential grants, and the verification of JSON Web Tokens.

Besides the two static tokens (``--publish-token``, ``--view-token``: one role, every
stream), whepfan accepts JWTs (RFC 7519) that name a role, the streams it covers, and an
expiry. An issuer (the operator's web application) signs them with HS256 and a shared
secret (``--jwt-secret``), or with a private key whose public half whepfan reads from a
PEM file (``--jwt-public-key``) or a JWKS file (``--jwt-jwks``, RFC 7517 §5).

Claims
------
::

    {
      "role": "publish" | "view",   required: WHIP or WHEP (and the WHEP extensions)
      "stream": "concert",          exactly one of these two: one stream by name,
      "stream_prefix": "team7-",    or every stream whose name starts so ("" = all)
      "exp": 1767225600,            required (RFC 7519 §4.1.4), NumericDate
      "nbf": 1767222000,            optional (RFC 7519 §4.1.5)
      "sub": "user-42",             optional: who (RFC 7519 §4.1.2)
      "jti": "5f0c...",             optional: which grant (RFC 7519 §4.1.7)
      "aud": "whepfan",             required to match when --jwt-audience is set, and
                                    refused when it is not (RFC 7519 §4.1.3 MUST)
      "iss": "https://app.example"  required to match when --jwt-issuer is set
    }

Stream names are URL-safe (``[A-Za-z0-9._~-]``), so a prefix is a naming convention
such as ``team7-`` or ``eu.``. ``exp`` and ``nbf`` allow ``--jwt-leeway`` seconds of
clock skew (default 30).

Sessions are bound to the credential that made them (``whepfan.http.auth``): a JWT with
a ``jti`` is known by (``iss``, ``sub``, ``jti``), so an issuer that refreshes a
player's token keeps ``sub`` and ``jti`` to keep that player's sessions; a JWT without
one is known by its own bytes.

Keys and algorithms
-------------------
The ``alg`` in a token's header is never trusted on its own (RFC 8725 §2.1, §3.1): each
configured key accepts exactly one algorithm, fixed when the key is loaded, and a token
is checked only against keys of its header's algorithm. ``none`` is accepted by no key,
and an HS256 token can only meet the shared secret, never a public key used as an HMAC
secret (the algorithm-confusion attack, RFC 8725 §2.1).

======================  =========================================================
key                     algorithm
======================  =========================================================
``--jwt-secret``        HS256; at least 32 bytes (RFC 7518 §3.2)
RSA (PEM or JWK)        RS256 (a JWK's ``alg`` may name RS384/512 or PS256/384/512);
                        at least 2048 bits (RFC 7518 §3.3)
EC P-256 / P-384 /      ES256 / ES384 / ES512 (RFC 7518 §3.4)
P-521
Ed25519                 EdDSA (RFC 8037 §3.1)
======================  =========================================================

A token whose header names a ``kid`` that the JWKS holds is checked against that key
only (RFC 7515 §4.1.4), and a token with no or an unknown ``kid`` against the keys that
have none (the secret, the PEM key). The JWKS file is re-read when it changes (one stat
per token): for key rotation, publish the new key before issuing tokens with it; remove
a key to revoke it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import jwt
import orjson
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from whepfan.errors import Unauthorized

log = logging.getLogger("whepfan.http.tokens")

DEFAULT_LEEWAY = 30.0
MIN_SECRET_BYTES = 32  # RFC 7518 §3.2: a key at least as long as the hash output
MIN_RSA_BITS = 2048  # RFC 7518 §3.3
# What a JWK's "alg" may name for an RSA key (others verify one algorithm each), and how
# each kty is read. Never an HMAC algorithm: a JWKS file is public-key material, and the
# shared secret is --jwt-secret.
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_JWK_LOADERS = {
    "RSA": RSAAlgorithm.from_jwk,
    "EC": ECAlgorithm.from_jwk,
    "OKP": OKPAlgorithm.from_jwk,
}
# RFC 7518 §3.4: each curve has its algorithm (cryptography's curve names).
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
# What an error_description may carry (RFC 6750 §3: %x20-21 / %x23-5B / %x5D-7E).
_SHOWN_VALUE = re.compile(r"[A-Za-z0-9._~+/-]{1,40}")


class Role(Enum):
    """What a credential lets its holder do: publish (WHIP) or view (WHEP)."""

    PUBLISH = "publish"
    VIEW = "view"


@dataclass(frozen=True, slots=True)
class StreamScope:
    """The streams a credential covers: one by name, or every name with a prefix."""

    name: str | None = None
    prefix: str | None = None

    def __post_init__(self) -> None:
        if (self.name is None) == (self.prefix is None):
            raise ValueError("a stream scope is a name or a prefix")

    def covers(self, stream: str) -> bool:
        if self.name is not None:
            return stream == self.name
        assert self.prefix is not None
        return stream.startswith(self.prefix)

    @property
    def every_stream(self) -> bool:
        return self.prefix == ""

    def __str__(self) -> str:
        if self.name is not None:
            return f"stream {self.name}"
        return "every stream" if self.every_stream else f"streams {self.prefix}*"


EVERY_STREAM = StreamScope(prefix="")


@dataclass(frozen=True, slots=True, kw_only=True)
class Grant:
    """What a verified credential allows, and who it is for session binding."""

    role: Role
    streams: StreamScope
    # Sessions made with this credential are bound to it (whepfan.http.auth). A digest,
    # so neither a token nor its claims are kept in memory longer than the request.
    binding: bytes
    subject: str | None = None
    expires_at: float | None = None

    @classmethod
    def static(cls, role: Role) -> Grant:
        """A static token's grant: its role on every stream; every holder is the same
        credential, as a shared token cannot tell its holders apart."""
        return cls(role=role, streams=EVERY_STREAM, binding=b"static:" + role.value.encode())


class InvalidToken(Unauthorized):
    """A bearer token that is not (or no longer) valid: 401 ``invalid_token`` with
    ``description`` (RFC 6750 §3.1). Never carries the token or its claims verbatim."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class KeyConfigError(ValueError):
    """A configured key cannot be used (the server refuses to start)."""


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One key and the one algorithm it verifies (see the module docstring)."""

    algorithm: str
    key: Any  # bytes for HS256, else a cryptography public key
    kid: str | None = None
    origin: str = ""  # where it came from, for messages: "--jwt-public-key FILE"


def secret_key(secret: str | bytes) -> VerificationKey:
    """The HS256 key for ``--jwt-secret``."""
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    if len(raw) < MIN_SECRET_BYTES:
        raise KeyConfigError(
            f"jwt_secret: at least {MIN_SECRET_BYTES} bytes for HS256 (RFC 7518 §3.2); "
            "e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return VerificationKey("HS256", raw, origin="jwt_secret")


def public_key_from_pem(data: bytes, *, origin: str = "PEM") -> VerificationKey:
    """A public key (``BEGIN PUBLIC KEY``) or certificate (``BEGIN CERTIFICATE``), with
    the algorithm its type verifies."""
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            public_key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            public_key = serialization.load_pem_public_key(data)
    except ValueError:
        raise KeyConfigError(
            f"{origin}: not a PEM public key or certificate (a private key is never needed here)"
        ) from None
    return VerificationKey(_algorithm_for(public_key, origin), public_key, origin=origin)


def _algorithm_for(public_key: Any, origin: str) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise KeyConfigError(f"{origin}: RSA keys have at least {MIN_RSA_BITS} bits")
        return "RS256"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        algorithm = _EC_ALGORITHMS.get(public_key.curve.name)
        if algorithm is None:
            raise KeyConfigError(f"{origin}: curve {public_key.curve.name} is not P-256/384/521")
        return algorithm
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise KeyConfigError(f"{origin}: only RSA, EC (P-256/384/521) and Ed25519 keys are used")


def keys_from_jwks(document: object, *, origin: str = "JWKS") -> tuple[VerificationKey, ...]:
    """The signature keys of a JWK Set (RFC 7517 §5). Keys for another use (``use`` not
    ``sig``, RFC 7517 §4.2) are skipped; anything unusable is an error, so a typo does not
    silently leave the server without the key its issuer signs with."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise KeyConfigError(f'{origin}: a JWK Set is a JSON object with a "keys" array')
    keys: list[VerificationKey] = []
    seen: set[str] = set()
    for index, jwk in enumerate(document["keys"]):
        where = f"{origin} key {index}"
        if not isinstance(jwk, Mapping):
            raise KeyConfigError(f"{where}: a JWK is a JSON object")
        if jwk.get("use", "sig") != "sig":
            continue
        kid = jwk.get("kid")
        if kid is not None and (not isinstance(kid, str) or not kid):
            raise KeyConfigError(f"{where}: kid is a non-empty string")
        if kid is not None:
            if kid in seen:
                raise KeyConfigError(f"{where}: kid {kid!r} appears twice")
            seen.add(kid)
            where = f"{origin} key {kid!r}"
        keys.append(_jwk_key(jwk, kid, where))
    if not keys:
        raise KeyConfigError(f"{origin}: no signature keys")
    return tuple(keys)


def _jwk_key(jwk: Mapping[str, Any], kid: str | None, where: str) -> VerificationKey:
    kty = jwk.get("kty")
    if "d" in jwk or kty == "oct":
        # A private or symmetric key in a file meant to be public: refuse it loudly.
        raise KeyConfigError(f"{where}: a JWKS here holds public keys only (kty RSA/EC/OKP)")
    loader = _JWK_LOADERS.get(kty) if isinstance(kty, str) else None
    if loader is None:
        raise KeyConfigError(f"{where}: kty {_shown(kty)} is not RSA, EC or OKP")
    try:
        public_key = loader(dict(jwk))
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        # PyJWT's messages quote the whole JWK: say which one instead.
        raise KeyConfigError(f"{where}: not a valid {kty} public key") from None
    default = _algorithm_for(public_key, where)
    algorithm = jwk.get("alg", default)
    allowed = _RSA_ALGORITHMS if default == "RS256" else frozenset({default})
    if algorithm not in allowed:
        raise KeyConfigError(f"{where}: alg {_shown(algorithm)} does not fit this {kty} key")
    return VerificationKey(algorithm, public_key, kid=kid, origin=where)


@dataclass(eq=False, kw_only=True)
class JwksFile:
    """Keys from a JWKS file, re-read when the file changes (key rotation)."""

    path: Path
    keys: tuple[VerificationKey, ...] = ()
    _stamp: tuple[int, int] | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: Path) -> JwksFile:
        source = cls(path=path)
        source.keys, source._stamp = source._read()
        return source

    def refresh(self) -> bool:
        """Re-read the file if it changed since it was read; True when keys changed. A
        file caught half-written or broken keeps the keys that were good (and says so)."""
        try:
            stamp = self._stat()
        except OSError as exc:
            log.warning("JWKS %s: %s; keeping the keys read before", self.path, exc.strerror)
            return False
        if stamp == self._stamp:
            return False
        try:
            keys, stamp = self._read()
        except KeyConfigError as exc:
            log.warning("%s; keeping the keys read before", exc)
            return False
        changed = keys != self.keys
        self.keys, self._stamp = keys, stamp
        if changed:
            log.info("JWKS %s re-read: %d signature keys", self.path, len(keys))
        return changed

    def _stat(self) -> tuple[int, int]:
        stat = os.stat(self.path)
        return stat.st_mtime_ns, stat.st_size

    def _read(self) -> tuple[tuple[VerificationKey, ...], tuple[int, int]]:
        try:
            stamp = self._stat()
            data = self.path.read_bytes()
        except OSError as exc:
            raise KeyConfigError(f"jwt_jwks: cannot read {self.path}: {exc.strerror}") from None
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise KeyConfigError(f"jwt_jwks: {self.path} is not JSON") from None
        return keys_from_jwks(document, origin=f"jwt_jwks {self.path}"), stamp


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True, slots=True, kw_only=True)
class JwtPolicy:
    """What a JWT must say besides its signature (see the module docstring)."""

    audience: str | None = None
    issuer: str | None = None
    leeway: float = DEFAULT_LEEWAY

    def __post_init__(self) -> None:
        if not 0 <= self.leeway <= 300:  # also refuses NaN
            raise KeyConfigError("jwt_leeway: 0 to 300 seconds")


class JwtVerifier:
    """Checks a JWT against the configured keys and policy and returns its Grant. Sans-IO
    but for the JWKS file's stat: time is the ``now`` argument."""

    def __init__(
        self,
        *,
        keys: Sequence[VerificationKey] = (),
        jwks: JwksFile | None = None,
        policy: JwtPolicy | None = None,
    ) -> None:
        if not keys and jwks is None:
            raise KeyConfigError("a JWT verifier needs a secret, a public key or a JWKS")
        self.policy = policy or JwtPolicy()
        self._keys = tuple(keys)  # the ones without a kid: secret, PEM key
        self._jwks = jwks

    @classmethod
    def from_settings(
        cls,
        *,
        secret: str | None = None,
        public_key: Path | None = None,
        jwks: Path | None = None,
        policy: JwtPolicy | None = None,
    ) -> JwtVerifier | None:
        """The verifier for the ``jwt_*`` settings, or None when no key is configured;
        KeyConfigError when a key is unusable."""
        keys: list[VerificationKey] = []
        if secret is not None:
            keys.append(secret_key(secret))
        if public_key is not None:
            try:
                pem = public_key.read_bytes()
            except OSError as exc:
                raise KeyConfigError(
                    f"jwt_public_key: cannot read {public_key}: {exc.strerror}"
                ) from None
            keys.append(public_key_from_pem(pem, origin=f"jwt_public_key {public_key}"))
        source = JwksFile.load(jwks) if jwks is not None else None
        if not keys and source is None:
            return None
        return cls(keys=keys, jwks=source, policy=policy)

    @property
    def algorithms(self) -> frozenset[str]:
        """Every algorithm some configured key accepts."""
        return frozenset(key.algorithm for key in self._all_keys())

    def verify(self, token: str, now: float) -> Grant:
        """The Grant of a valid token, or InvalidToken saying what is wrong with it."""
        if not token.isascii():  # base64url and dots only (RFC 7515 §7.1)
            raise InvalidToken("the bearer token is not valid for this resource")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("the bearer token is not valid for this resource") from None
        algorithm = header.get("alg")
        kid = header.get("kid")
        if not isinstance(algorithm, str) or algorithm not in self.algorithms:
            # Covers "none" (RFC 8725 §3.1) and a token meant for another key type.
            raise InvalidToken(f"algorithm {_shown(algorithm)} is not accepted here")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("the token's kid is not a string")
        candidates = self._candidates(algorithm, kid)
        if not candidates:
            raise InvalidToken(f"no key with kid {_shown(kid)} verifies {algorithm}")
        for key in candidates:
            claims = self._decode(token, key)
            if claims is not None:
                return self._grant(token, claims, now)
        raise InvalidToken("the token's signature does not verify")

    def _all_keys(self) -> tuple[VerificationKey, ...]:
        return self._keys + (self._jwks.keys if self._jwks is not None else ())

    def _candidates(self, algorithm: str, kid: str | None) -> list[VerificationKey]:
        """The keys a token of this header may be checked against (module docstring)."""
        if self._jwks is not None:
            # One stat per token: a key added to the file is usable, and a key removed
            # from it revoked, from the next token on.
            self._jwks.refresh()
        if kid is not None and self._jwks is not None:
            named = [key for key in self._jwks.keys if key.kid == kid]
            if named:
                # The header picked a key: its algorithm is the key's, never the header's.
                return [key for key in named if key.algorithm == algorithm]
        return [key for key in self._all_keys() if key.kid is None and key.algorithm == algorithm]

    def _decode(self, token: str, key: VerificationKey) -> dict[str, Any] | None:
        """The claims if ``key`` verifies the signature, None if it does not. Times are
        checked by :meth:`_grant` against ``now``, not PyJWT's wall clock."""
        policy = self.policy
        try:
            return jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=policy.audience,
                issuer=policy.issuer,
                options={
                    "require": ["exp"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    # sub and jti are type-checked by _grant (PyJWT >= 2.10 does it too).
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.InvalidSignatureError:
            return None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"the token has no {exc.claim} claim") from None
        except jwt.InvalidAudienceError:
            if policy.audience is None:
                raise InvalidToken(
                    "the token names an audience (aud) and this server has none"
                ) from None
            raise InvalidToken(f"the token is not for audience {policy.audience}") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("the token is not from the configured issuer (iss)") from None
        except jwt.PyJWTError:
            raise InvalidToken("the token does not decode") from None

    def _grant(self, token: str, claims: Mapping[str, Any], now: float) -> Grant:
        leeway = self.policy.leeway
        expires_at = _numeric_date(claims, "exp")
        assert expires_at is not None  # required by _decode
        if now > expires_at + leeway:
            raise InvalidToken("the token has expired")
        not_before = _numeric_date(claims, "nbf")
        if not_before is not None and now + leeway < not_before:
            raise InvalidToken("the token is not valid yet (nbf)")
        try:
            role = Role(claims.get("role"))
        except ValueError:
            raise InvalidToken("the token's role is not publish or view") from None
        subject = _optional_string(claims, "sub")
        return Grant(
            role=role,
            streams=_scope(claims),
            binding=_binding(token, claims),
            subject=subject,
            expires_at=expires_at,
        )


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """RFC 7519 §2 NumericDate: a JSON number of seconds since the epoch."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidToken(f"the token's {name} is not a NumericDate")
    return float(value)


def _optional_string(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidToken(f"the token's {name} is not a string")
    return value


def _scope(claims: Mapping[str, Any]) -> StreamScope:
    name = _optional_string(claims, "stream")
    prefix = _optional_string(claims, "stream_prefix")
    if (name is None) == (prefix is None):
        raise InvalidToken("the token names exactly one of stream and stream_prefix")
    if name == "":
        raise InvalidToken("the token's stream is empty (an empty stream_prefix is every stream)")
    return StreamScope(name=name, prefix=prefix)


def _binding(token: str, claims: Mapping[str, Any]) -> bytes:
    """Who a session made with this token belongs to (module docstring)."""
    jti = _optional_string(claims, "jti")
    if jti is not None:
        issuer, subject = claims.get("iss"), _optional_string(claims, "sub")
        identity = orjson.dumps(["jti", issuer if isinstance(issuer, str) else None, subject, jti])
    else:
        identity = b"token\0" + token.encode("utf-8", "surrogatepass")
    return hashlib.sha256(identity).digest()


def _shown(value: object) -> str:
    """An untrusted header value, fit for an error_description (RFC 6750 §3) and a log."""
    if isinstance(value, str) and _SHOWN_VALUE.fullmatch(value):
        return value
    return "(unprintable)" if value is not None else "(none)"
