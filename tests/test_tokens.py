"""Scoped bearer tokens (issue 16): JWT verification on virtual time (claims, expiry,
keys, algorithms, the attacks RFC 8725 names), and the whole HTTP surface with JWTs over
the real router, including sessions bound to the credential that made them.

Keys are generated here with ``cryptography``; tokens are made with PyJWT, and the
malicious ones (``alg: none``, HS256 keyed with a public key) by hand, since PyJWT
refuses to make them.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from _paths import SDP_FIXTURES
from _peers import only_loopback_candidates
from _server import LiveServer, media_worker, settings_for
from _signalling import JSON, SDP
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from whepfan.cli import build_parser
from whepfan.errors import NotFound
from whepfan.http import HttpOptions, IceServer, create_app
from whepfan.http.auth import AccessControl
from whepfan.http.events import EVENTS_REL
from whepfan.http.layers import LAYER_REL
from whepfan.http.tokens import (
    EVERY_STREAM,
    InvalidToken,
    JwksFile,
    JwtPolicy,
    JwtVerifier,
    KeyConfigError,
    Role,
    StreamScope,
    keys_from_jwks,
    public_key_from_pem,
    secret_key,
)
from whepfan.media.transport import MediaWorker
from whepfan.settings import Settings, SettingsError

WHEP_OFFER = (SDP_FIXTURES / "chromium-156-whep-recvonly-offer.sdp").read_text()
WHIP_OFFER = (SDP_FIXTURES / "chromium-156-whip-sendonly-offer.sdp").read_text()
NOW = 1_800_000_000.0  # the app's wall clock: every exp below is relative to it
SECRET = "an-hs256-secret-of-at-least-32-bytes!"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_KEY_2 = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
FRAG = {"Content-Type": "application/trickle-ice-sdpfrag"}
STUN = IceServer(url="stun:stun.example.net:3478")
LINK = re.compile(r'<(?P<url>[^>]+)>; rel="(?P<rel>[^"]+)"')


def pem(private_key: Any) -> bytes:
    return bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def claims(**overrides: object) -> dict[str, object]:
    values: dict[str, object] = {"role": "view", "stream": "live", "exp": NOW + 600}
    values.update(overrides)
    return {name: value for name, value in values.items() if value is not None}


def hs256(**overrides: object) -> str:
    return jwt.encode(claims(**overrides), SECRET, algorithm="HS256")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, object], payload: dict[str, object], key: bytes | None) -> str:
    """A JWS compact serialisation (RFC 7515 §7.1) signed with HMAC-SHA256 over ``key``,
    or with an empty signature: what an attacker sends."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b"" if key is None else hmac.digest(key, signing_input.encode(), hashlib.sha256)
    return f"{signing_input}.{b64(signature)}"


def hs_verifier(**policy: Any) -> JwtVerifier:
    return JwtVerifier(keys=[secret_key(SECRET)], policy=JwtPolicy(**policy))


def jwk_of(private_key: Any, kid: str) -> dict[str, Any]:
    algorithm = RSAAlgorithm if isinstance(private_key, rsa.RSAPrivateKey) else ECAlgorithm
    document = orjson.loads(algorithm.to_jwk(private_key.public_key()))
    document["kid"] = kid
    return dict(document)


def write_jwks(path: Path, *keys: dict[str, Any], mtime: float = 1.0) -> Path:
    path.write_bytes(orjson.dumps({"keys": list(keys)}))
    # A distinct mtime per write, so a rewrite is seen even within one clock tick.
    os.utime(path, (mtime, mtime))
    return path


def refused(verifier: JwtVerifier, token: str, now: float = NOW) -> str:
    with pytest.raises(InvalidToken) as caught:
        verifier.verify(token, now)
    return caught.value.description


# ---------------------------------------------------------------------------- claims


def test_an_hs256_token_grants_its_role_on_its_stream() -> None:
    grant = hs_verifier().verify(hs256(sub="alice", jti="g1"), NOW)
    assert grant.role is Role.VIEW and grant.subject == "alice"
    assert grant.streams == StreamScope(name="live")
    assert grant.streams.covers("live") and not grant.streams.covers("live2")
    assert grant.expires_at == NOW + 600
    prefixed = hs_verifier().verify(hs256(stream=None, stream_prefix="team7-"), NOW)
    assert prefixed.streams.covers("team7-main") and not prefixed.streams.covers("team8-main")
    every = hs_verifier().verify(hs256(stream=None, stream_prefix="", role="publish"), NOW)
    assert every.role is Role.PUBLISH and every.streams == EVERY_STREAM


def test_expiry_is_checked_against_now_with_leeway() -> None:
    verifier = hs_verifier(leeway=30)
    token = hs256(exp=NOW - 10)  # expired 10 s ago: within the leeway
    assert verifier.verify(token, NOW).role is Role.VIEW
    assert refused(verifier, hs256(exp=NOW - 31)) == "the token has expired"
    assert refused(hs_verifier(leeway=0), token) == "the token has expired"
    # The same token is fine at a time before its expiry: no wall clock is read.
    assert hs_verifier(leeway=0).verify(token, NOW - 20).role is Role.VIEW


def test_exp_is_required_and_nbf_is_honoured() -> None:
    verifier = hs_verifier(leeway=30)
    assert refused(verifier, hs256(exp=None)) == "the token has no exp claim"
    assert "NumericDate" in refused(verifier, hs256(exp="tomorrow"))
    assert "not valid yet" in refused(verifier, hs256(nbf=NOW + 31))
    assert verifier.verify(hs256(nbf=NOW + 29), NOW).role is Role.VIEW


@pytest.mark.parametrize(
    ("overrides", "description"),
    [
        ({"role": "admin"}, "role is not publish or view"),
        ({"role": None}, "role is not publish or view"),
        ({"stream": None}, "exactly one of stream and stream_prefix"),
        ({"stream_prefix": "a"}, "exactly one of stream and stream_prefix"),
        ({"stream": ""}, "stream is empty"),
        ({"stream": 7}, "stream is not a string"),
        ({"sub": 42}, "sub is not a string"),
        ({"jti": ["x"]}, "jti is not a string"),
    ],
)
def test_claims_outside_the_schema_are_refused(
    overrides: dict[str, object], description: str
) -> None:
    assert description in refused(hs_verifier(), hs256(**overrides))


def test_audience_and_issuer_when_configured() -> None:
    verifier = hs_verifier(audience="whepfan", issuer="https://app.example")
    good = hs256(aud="whepfan", iss="https://app.example")
    assert verifier.verify(good, NOW).role is Role.VIEW
    assert "audience" in refused(verifier, hs256(aud="other", iss="https://app.example"))
    assert "no aud claim" in refused(verifier, hs256(iss="https://app.example"))
    assert "issuer" in refused(verifier, hs256(aud="whepfan", iss="https://evil.example"))
    # RFC 7519 §4.1.3: a token for some audience is refused where none is configured.
    assert "names an audience" in refused(hs_verifier(), hs256(aud="whepfan"))


def test_the_binding_is_the_grant_for_a_jti_and_the_token_without_one() -> None:
    verifier = hs_verifier()
    first = verifier.verify(hs256(sub="alice", jti="g1"), NOW)
    refreshed = verifier.verify(hs256(sub="alice", jti="g1", exp=NOW + 900), NOW)
    assert first.binding == refreshed.binding  # a refreshed token keeps its sessions
    assert first.binding != verifier.verify(hs256(sub="bob", jti="g1"), NOW).binding
    assert first.binding != verifier.verify(hs256(sub="alice", jti="g2"), NOW).binding
    plain = verifier.verify(hs256(sub="alice"), NOW)
    assert plain.binding != verifier.verify(hs256(sub="alice", exp=NOW + 1), NOW).binding


# ---------------------------------------------------------------------------- signatures


def test_a_bad_signature_is_refused() -> None:
    verifier = hs_verifier()
    forged = jwt.encode(claims(), "another-secret-that-is-32-bytes-long!", algorithm="HS256")
    assert refused(verifier, forged) == "the token's signature does not verify"
    # Tampered payload with the original signature.
    header, _, signature = hs256().split(".")
    payload = b64(orjson.dumps(claims(stream_prefix="", stream=None)))
    assert refused(verifier, f"{header}.{payload}.{signature}") == (
        "the token's signature does not verify"
    )
    assert refused(verifier, "not-a-jwt") == "the bearer token is not valid for this resource"
    assert refused(verifier, "a.b.c") == "the bearer token is not valid for this resource"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature_key", [None, SECRET.encode()])
def test_alg_none_is_refused(alg: str, signature_key: bytes | None) -> None:
    token = handmade({"alg": alg, "typ": "JWT"}, claims(), signature_key)
    verifier = JwtVerifier(
        keys=[secret_key(SECRET), public_key_from_pem(pem(RSA_KEY))], policy=JwtPolicy()
    )
    assert refused(verifier, token).startswith("algorithm ")
    # PyJWT's own unsecured JWT (RFC 7519 §6) too.
    assert refused(verifier, jwt.encode(claims(), None, algorithm="none")) == (
        "algorithm none is not accepted here"
    )


@pytest.mark.parametrize("private_key", [RSA_KEY, EC_KEY, ED_KEY], ids=["RS256", "ES256", "EdDSA"])
def test_alg_confusion_hs256_keyed_with_the_public_key_is_refused(private_key: Any) -> None:
    """RFC 8725 §2.1: a verifier that let the header pick the algorithm would check an
    HS256 token with the public key's PEM bytes as the HMAC secret, which anyone has."""
    public_pem = pem(private_key)
    public_key = public_key_from_pem(public_pem)
    for header in ({"alg": "HS256"}, {"alg": "HS256", "typ": "JWT"}):
        forged = handmade(header, claims(role="publish", stream_prefix="", stream=None), public_pem)
        only_public = JwtVerifier(keys=[public_key])
        assert refused(only_public, forged) == "algorithm HS256 is not accepted here"
        # With a shared secret configured too, HS256 meets only that secret.
        both = JwtVerifier(keys=[secret_key(SECRET), public_key])
        assert refused(both, forged) == "the token's signature does not verify"


@pytest.mark.parametrize(
    ("private_key", "algorithm"),
    [(RSA_KEY, "RS256"), (EC_KEY, "ES256"), (ED_KEY, "EdDSA")],
)
def test_public_keys_verify_their_one_algorithm(
    tmp_path: Path, private_key: Any, algorithm: str
) -> None:
    key_file = tmp_path / "issuer.pem"
    key_file.write_bytes(pem(private_key))
    verifier = JwtVerifier.from_settings(public_key=key_file)
    assert verifier is not None and verifier.algorithms == {algorithm}
    token = jwt.encode(claims(), private_key, algorithm=algorithm)
    assert verifier.verify(token, NOW).streams == StreamScope(name="live")
    if algorithm == "RS256":
        # The same key with another RSA algorithm: the key accepts RS256 only.
        other = jwt.encode(claims(), private_key, algorithm="PS256")
        assert refused(verifier, other) == "algorithm PS256 is not accepted here"
    wrong_key = jwt.encode(claims(), EC_KEY_2, algorithm="ES256")
    if algorithm == "ES256":
        assert refused(verifier, wrong_key) == "the token's signature does not verify"


def test_a_certificate_pem_gives_its_public_key() -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(EC_KEY.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2035, 1, 1, tzinfo=datetime.UTC))
        .sign(EC_KEY, hashes.SHA256())
    )
    key = public_key_from_pem(certificate.public_bytes(serialization.Encoding.PEM))
    assert key.algorithm == "ES256"
    token = jwt.encode(claims(), EC_KEY, algorithm="ES256")
    assert JwtVerifier(keys=[key]).verify(token, NOW).role is Role.VIEW


# ---------------------------------------------------------------------------- JWKS


def test_jwks_with_two_keys_selects_by_kid(tmp_path: Path) -> None:
    path = write_jwks(tmp_path / "jwks.json", jwk_of(EC_KEY, "ec-1"), jwk_of(RSA_KEY, "rsa-1"))
    verifier = JwtVerifier(jwks=JwksFile.load(path))
    assert verifier.algorithms == {"ES256", "RS256"}
    by_ec = jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "ec-1"})
    by_rsa = jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "rsa-1"})
    assert verifier.verify(by_ec, NOW).role is Role.VIEW
    assert verifier.verify(by_rsa, NOW).role is Role.VIEW
    # The header's kid names the key; its alg must be that key's.
    mislabelled = jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "ec-1"})
    assert refused(verifier, mislabelled) == "no key with kid ec-1 verifies RS256"
    other_key = jwt.encode(claims(), EC_KEY_2, algorithm="ES256", headers={"kid": "ec-1"})
    assert refused(verifier, other_key) == "the token's signature does not verify"
    # Several keys and no kid: nothing to pick with (no key is tried blindly).
    no_kid = jwt.encode(claims(), EC_KEY, algorithm="ES256")
    assert refused(verifier, no_kid) == "no key with kid (none) verifies ES256"
    unknown = jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "ec-9"})
    assert refused(verifier, unknown) == "no key with kid ec-9 verifies ES256"


def test_a_rotated_jwks_file_is_read_again(tmp_path: Path) -> None:
    path = write_jwks(tmp_path / "jwks.json", jwk_of(EC_KEY, "2026-01"))
    verifier = JwtVerifier(jwks=JwksFile.load(path))
    rotated = jwt.encode(claims(), EC_KEY_2, algorithm="ES256", headers={"kid": "2026-02"})
    assert "kid 2026-02" in refused(verifier, rotated)
    write_jwks(path, jwk_of(EC_KEY, "2026-01"), jwk_of(EC_KEY_2, "2026-02"), mtime=2.0)
    assert verifier.verify(rotated, NOW).role is Role.VIEW
    # A broken rewrite keeps the keys that were good.
    path.write_text("{not json")
    os.utime(path, (3.0, 3.0))
    assert verifier.verify(rotated, NOW).role is Role.VIEW
    unknown = jwt.encode(claims(), EC_KEY_2, algorithm="ES256", headers={"kid": "2026-03"})
    assert "kid 2026-03" in refused(verifier, unknown)
    # Removing a key revokes it from the next token on.
    old = jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "2026-01"})
    assert verifier.verify(old, NOW).role is Role.VIEW
    write_jwks(path, jwk_of(EC_KEY_2, "2026-02"), mtime=4.0)
    assert refused(verifier, old) == "no key with kid 2026-01 verifies ES256"
    assert verifier.verify(rotated, NOW).role is Role.VIEW


def test_secret_and_public_key_and_jwks_together(tmp_path: Path) -> None:
    key_file = tmp_path / "rsa.pem"
    key_file.write_bytes(pem(RSA_KEY))
    jwks = write_jwks(tmp_path / "jwks.json", jwk_of(EC_KEY, "ec-1"))
    verifier = JwtVerifier.from_settings(secret=SECRET, public_key=key_file, jwks=jwks)
    assert verifier is not None
    assert verifier.verify(hs256(), NOW).role is Role.VIEW
    # A kid the JWKS does not hold falls back to the keys without one (the PEM key).
    rsa_token = jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "idp-7"})
    assert verifier.verify(rsa_token, NOW).role is Role.VIEW
    ec_token = jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "ec-1"})
    assert verifier.verify(ec_token, NOW).role is Role.VIEW
    assert JwtVerifier.from_settings() is None


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"keys": "x"}, 'a JSON object with a "keys" array'),
        ({"keys": []}, "no signature keys"),
        ({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, "public keys only"),
        ({"keys": [{**jwk_of(EC_KEY, "a"), "d": "AAAA"}]}, "public keys only"),
        ({"keys": [{**jwk_of(EC_KEY, "a"), "alg": "HS256"}]}, "alg HS256 does not fit"),
        ({"keys": [{**jwk_of(EC_KEY, "a"), "alg": "ES384"}]}, "alg ES384 does not fit"),
        ({"keys": [{**jwk_of(RSA_KEY, "a"), "alg": "none"}]}, "alg none does not fit"),
        ({"keys": [jwk_of(EC_KEY, "a"), jwk_of(EC_KEY_2, "a")]}, "appears twice"),
        ({"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}, "not a valid EC"),
        ({"keys": [{"kty": "XYZ"}]}, "kty XYZ is not RSA, EC or OKP"),
    ],
)
def test_unusable_jwks_documents_are_refused(document: object, message: str) -> None:
    with pytest.raises(KeyConfigError, match=message):
        keys_from_jwks(document)


def test_encryption_keys_in_a_jwks_are_skipped() -> None:
    keys = keys_from_jwks(
        {"keys": [{**jwk_of(RSA_KEY, "enc"), "use": "enc"}, jwk_of(EC_KEY, "sig")]}
    )
    assert [key.kid for key in keys] == ["sig"]


def test_weak_or_wrong_keys_are_refused() -> None:
    with pytest.raises(KeyConfigError, match="at least 32 bytes"):
        secret_key("short")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(KeyConfigError, match="at least 2048 bits"):
        public_key_from_pem(pem(small))
    with pytest.raises(KeyConfigError, match="not a PEM public key"):
        public_key_from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    secp256k1 = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(KeyConfigError, match="is not P-256/384/521"):
        public_key_from_pem(pem(secp256k1))
    with pytest.raises(KeyConfigError, match="0 to 300 seconds"):
        JwtPolicy(leeway=float("nan"))


# ---------------------------------------------------------------------------- access control


def test_static_tokens_and_jwts_side_by_side() -> None:
    access = AccessControl(
        publish_token="pub-static", view_token=None, verifier=hs_verifier(), wall_clock=lambda: NOW
    )
    assert access.requires_credentials(Role.VIEW)  # a JWT key closes viewing
    static = access.authorize("Bearer pub-static", Role.PUBLISH, "any")
    assert static is not None and static.streams == EVERY_STREAM
    viewer = access.authorize(f"Bearer {hs256()}", Role.VIEW, "live")
    assert viewer is not None and viewer.role is Role.VIEW
    open_access = AccessControl(publish_token="p")
    assert open_access.authorize("Bearer garbage", Role.VIEW, "live") is None


# ---------------------------------------------------------------------------- HTTP


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_loopback_candidates(monkeypatch)


@pytest.fixture
async def worker() -> AsyncIterator[MediaWorker]:
    async with media_worker() as media:
        yield media


Serve = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def serve(worker: MediaWorker) -> AsyncIterator[Serve]:
    """Start the real application over the real router with HttpOptions ``overrides``
    (by default: static tokens and HS256 JWTs), its wall clock frozen at NOW."""
    clients: list[TestClient] = []

    async def start(**overrides: Any) -> TestClient:
        values: dict[str, Any] = {
            "publish_token": "pub-static",
            "view_token": "view-static",
            "jwt": hs_verifier(),
            "ice_servers": (STUN,),
        }
        values.update(overrides)
        app = create_app(
            router=worker.router,
            clock=worker.now,
            options=HttpOptions(**values),
            wall_clock=lambda: NOW,
        )
        test_client = TestClient(TestServer(app))
        await test_client.start_server()
        clients.append(test_client)
        return test_client

    yield start
    for test_client in clients:
        await test_client.close()


@pytest.fixture
async def client(serve: Serve) -> TestClient:
    return await serve()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


PUBLISHER = bearer(hs256(role="publish", sub="encoder", jti="p1"))
VIEWER_A = bearer(hs256(sub="alice", jti="a1"))
VIEWER_B = bearer(hs256(sub="bob", jti="b1"))
STATIC_VIEWER = bearer("view-static")


async def publish(
    client: TestClient, headers: dict[str, str] = PUBLISHER, stream: str = "live"
) -> str:
    response = await client.post(f"/whip/{stream}", data=WHIP_OFFER, headers={**headers, **SDP})
    assert response.status == 201, await response.text()
    return str(response.headers["Location"])


async def view(client: TestClient, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
    """A WHEP session: its URL and its extension Links by rel."""
    response = await client.post("/whep/live", data=WHEP_OFFER, headers={**headers, **SDP})
    assert response.status == 201, await response.text()
    found = {}
    for value in response.headers.getall("Link", []):
        if match := LINK.match(value):
            found[match["rel"]] = match["url"]
    return str(response.headers["Location"]), found


def trickle(ufrag: str, pwd: str = "unused-for-trickle-000000") -> str:
    return (
        "a=group:BUNDLE 0 1\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n"
        f"a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\n"
        "a=candidate:1 1 udp 2122260223 192.0.2.1 61764 typ host\r\na=end-of-candidates\r\n"
    )


RESTART = trickle("new1", "newpassword0000000000000")


async def problem(response: ClientResponse, status: int) -> tuple[str, str]:
    """The challenge and detail of a refusal (RFC 6750 §3, RFC 9457)."""
    assert response.status == status, await response.text()
    assert response.headers["Content-Type"] == "application/problem+json"
    body = await response.json()
    assert body["status"] == status
    return response.headers["WWW-Authenticate"], body["detail"]


async def test_every_verb_and_endpoint_takes_a_jwt(client: TestClient) -> None:
    # WHIP: OPTIONS (ice-server Links only with the credential), POST, PATCH, DELETE.
    response = await client.options("/whip/live", headers=PUBLISHER)
    assert response.status == 200 and "Link" in response.headers
    assert "Link" not in (await client.options("/whip/live", headers=VIEWER_A)).headers
    publisher = await publish(client)
    response = await client.patch(publisher, data=trickle("/5MN"), headers={**PUBLISHER, **FRAG})
    assert response.status == 204
    response = await client.patch(publisher, data=RESTART, headers={**PUBLISHER, **FRAG})
    assert response.status == 200 and response.headers["ETag"]
    # WHEP: OPTIONS, POST, PATCH, the layer API, an event subscription, status, DELETE.
    response = await client.options("/whep/live", headers=VIEWER_A)
    assert response.status == 200 and "Link" in response.headers
    viewer, extension = await view(client, VIEWER_A)
    response = await client.patch(viewer, data=trickle("hF/U"), headers={**VIEWER_A, **FRAG})
    assert response.status == 204
    response = await client.patch(viewer, data=RESTART, headers={**VIEWER_A, **FRAG})
    assert response.status == 200
    layer = extension[LAYER_REL]
    assert (await client.get(layer, headers=VIEWER_A)).status == 200
    response = await client.post(layer, data=b"{}", headers={**VIEWER_A, **JSON})
    assert response.status == 200
    assert (await client.delete(layer, headers=VIEWER_A)).status == 200
    response = await client.post(
        extension[EVENTS_REL], data=b'["active"]', headers={**VIEWER_A, **JSON}
    )
    assert response.status == 201
    response = await client.get("/api/streams/live", headers=VIEWER_A)
    assert response.status == 200 and (await response.json())["viewers"] == 1
    response = await client.get("/api/streams", headers=VIEWER_A)
    assert [stream["name"] for stream in (await response.json())["streams"]] == ["live"]
    assert (await client.delete(viewer, headers=VIEWER_A)).status == 200
    assert (await client.delete(publisher, headers=PUBLISHER)).status == 200


INVALID = 'Bearer realm="whepfan", error="invalid_token", error_description="{}"'
FORBIDDEN = 'Bearer realm="whepfan", error="insufficient_scope", error_description="{}"'


@pytest.mark.parametrize(
    ("path", "token", "status", "description"),
    [
        ("/whep/live", hs256(exp=NOW - 3600), 401, "the token has expired"),
        (
            "/whep/live",
            hs256(stream="other"),
            403,
            "this token covers stream other, not stream live",
        ),
        (
            "/whep/live",
            hs256(stream=None, stream_prefix="team7-"),
            403,
            "this token covers streams team7-*, not stream live",
        ),
        ("/whep/live", hs256(role="publish"), 403, "a publish token cannot view"),
        ("/whip/live", hs256(), 403, "a view token cannot publish"),
        ("/whip/live", "view-static", 403, "a view token cannot publish"),
        (
            "/whep/live",
            jwt.encode(claims(), "x" * 32, algorithm="HS256"),
            401,
            "the token's signature does not verify",
        ),
        (
            "/whep/live",
            handmade({"alg": "none"}, claims(), None),
            401,
            "algorithm none is not accepted here",
        ),
        (
            "/whip/live",
            handmade({"alg": "RS256"}, claims(role="publish"), None),
            401,
            "algorithm RS256 is not accepted here",
        ),
        ("/whep/live", "undefined", 401, "the bearer token is not valid for this resource"),
    ],
)
async def test_refusals_say_why_in_the_challenge_and_the_problem(
    client: TestClient, path: str, token: str, status: int, description: str
) -> None:
    await publish(client, stream="live")
    offer = WHEP_OFFER if path.startswith("/whep") else WHIP_OFFER
    response = await client.post(path, data=offer, headers={**bearer(token), **SDP})
    challenge, detail = await problem(response, status)
    template = INVALID if status == 401 else FORBIDDEN
    assert challenge == template.format(description.replace('"', "'"))
    assert detail == description


async def test_with_a_jwt_key_viewing_needs_a_credential(serve: Serve) -> None:
    client = await serve(view_token=None)
    await publish(client)
    response = await client.post("/whep/live", data=WHEP_OFFER, headers=SDP)
    challenge, _ = await problem(response, 401)
    assert challenge == 'Bearer realm="whepfan"'  # RFC 6750 §3.1: no code without credentials
    await view(client, VIEWER_A)


async def test_a_viewers_session_refuses_another_viewers_token(client: TestClient) -> None:
    await publish(client)
    viewer, extension = await view(client, VIEWER_A)
    layer, events = extension[LAYER_REL], extension[EVENTS_REL]
    for other in (VIEWER_B, STATIC_VIEWER):
        attempts = [
            client.delete(viewer, headers=other),
            client.patch(viewer, data=trickle("hF/U"), headers={**other, **FRAG}),
            client.patch(viewer, data=RESTART, headers={**other, **FRAG}),
            client.get(layer, headers=other),
            client.post(layer, data=b'{"rid":"f"}', headers={**other, **JSON}),
            client.delete(layer, headers=other),
            client.post(events, data=b'["active"]', headers={**other, **JSON}),
        ]
        for attempt in attempts:
            challenge, detail = await problem(await attempt, 403)
            assert detail == "this session was created with another credential"
            assert 'error="insufficient_scope"' in challenge
    # No credential at all is a 401 (the session's role needs one), not a 403.
    await problem(await client.delete(viewer), 401)
    # The session is untouched, and a refreshed token of the same grant (sub + jti) owns it.
    refreshed = bearer(hs256(sub="alice", jti="a1", exp=NOW + 7200))
    response = await client.patch(viewer, data=trickle("hF/U"), headers={**refreshed, **FRAG})
    assert response.status == 204
    assert (await client.delete(viewer, headers=refreshed)).status == 200


async def test_a_session_without_jti_is_bound_to_its_token(client: TestClient) -> None:
    await publish(client)
    token = bearer(hs256(sub="carol"))
    viewer, _ = await view(client, token)
    same_subject = bearer(hs256(sub="carol", exp=NOW + 601))
    await problem(await client.delete(viewer, headers=same_subject), 403)
    assert (await client.delete(viewer, headers=token)).status == 200


async def test_static_token_sessions_are_bound_to_the_static_token(client: TestClient) -> None:
    publisher = await publish(client, bearer("pub-static"))
    await problem(await client.delete(publisher, headers=PUBLISHER), 403)
    viewer, _ = await view(client, STATIC_VIEWER)
    await problem(await client.delete(viewer, headers=VIEWER_A), 403)
    assert (await client.delete(viewer, headers=STATIC_VIEWER)).status == 200
    assert (await client.delete(publisher, headers=bearer("pub-static"))).status == 200


async def test_a_publishers_session_refuses_another_publishers_token(client: TestClient) -> None:
    publisher = await publish(client)
    rival = bearer(hs256(role="publish", sub="rival", jti="r1"))
    await problem(await client.delete(publisher, headers=rival), 403)
    response = await client.patch(publisher, data=RESTART, headers={**rival, **FRAG})
    await problem(response, 403)
    # Without takeover the rival cannot publish over it either (409, as before).
    response = await client.post("/whip/live", data=WHIP_OFFER, headers={**rival, **SDP})
    assert response.status == 409


async def test_publisher_takeover_is_unchanged_by_binding(
    serve: Serve, worker: MediaWorker
) -> None:
    client = await serve(publisher_takeover=True)
    first = await publish(client)
    rival = bearer(hs256(role="publish", sub="rival", jti="r1"))
    second = await publish(client, rival)
    # Another credential for the stream takes it over, as without binding...
    stream = worker.router.streams["live"]
    assert stream.publisher is not None and stream.publisher.id == second.rsplit("/", 1)[1]
    with pytest.raises(NotFound):
        worker.router.get_session(first.rsplit("/", 1)[1])
    # ...and the new session belongs to the rival.
    await problem(await client.delete(second, headers=PUBLISHER), 403)
    assert (await client.delete(second, headers=rival)).status == 200


async def test_the_stream_list_shows_a_scoped_token_its_streams(client: TestClient) -> None:
    for stream in ("team7-main", "team7-backup", "team8-main"):
        await publish(client, bearer("pub-static"), stream=stream)
    team7 = bearer(hs256(stream=None, stream_prefix="team7-"))
    body = await (await client.get("/api/streams", headers=team7)).json()
    assert [stream["name"] for stream in body["streams"]] == ["team7-backup", "team7-main"]
    assert body["egress_bitrate"] is None  # the server's total is not a tenant's business
    body = await (await client.get("/api/streams", headers=STATIC_VIEWER)).json()
    assert len(body["streams"]) == 3
    response = await client.get("/api/streams/team8-main", headers=team7)
    await problem(response, 403)
    await problem(await client.get("/api/streams", headers=PUBLISHER), 403)


async def test_rs256_and_es256_from_a_jwks_over_http(serve: Serve, tmp_path: Path) -> None:
    path = write_jwks(tmp_path / "jwks.json", jwk_of(RSA_KEY, "rsa-1"), jwk_of(EC_KEY, "ec-1"))
    client = await serve(
        publish_token=None, view_token=None, jwt=JwtVerifier(jwks=JwksFile.load(path))
    )
    publisher_token = jwt.encode(
        claims(role="publish"), RSA_KEY, algorithm="RS256", headers={"kid": "rsa-1"}
    )
    publisher = await publish(client, bearer(publisher_token))
    viewer_token = jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "ec-1"})
    viewer, _ = await view(client, bearer(viewer_token))
    # HS256 keyed with the RSA public key, kid and all: refused (RFC 8725 §2.1).
    forged = handmade({"alg": "HS256", "kid": "rsa-1"}, claims(), pem(RSA_KEY))
    challenge, _ = await problem(await client.delete(viewer, headers=bearer(forged)), 401)
    assert "algorithm HS256 is not accepted here" in challenge
    assert (await client.delete(viewer, headers=bearer(viewer_token))).status == 200
    assert (await client.delete(publisher, headers=bearer(publisher_token))).status == 200


async def test_tokens_are_never_logged(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await publish(client)
    viewer, _ = await view(client, VIEWER_A)
    expired = hs256(sub="bob", exp=NOW - 3600)
    await problem(await client.delete(viewer, headers=bearer(expired)), 401)
    await problem(await client.delete(viewer, headers=VIEWER_B), 403)
    text = caplog.text
    for header in (VIEWER_A, VIEWER_B, PUBLISHER, bearer(expired)):
        token = header["Authorization"].removeprefix("Bearer ")
        assert token not in text and token.split(".")[2] not in text
    assert "another credential" in text  # the refusal itself is logged, without the token


# ---------------------------------------------------------------------------- settings


def test_jwt_settings_from_the_command_line_environment_and_toml(tmp_path: Path) -> None:
    key_file = tmp_path / "issuer.pem"
    key_file.write_bytes(pem(EC_KEY))
    jwks = write_jwks(tmp_path / "jwks.json", jwk_of(RSA_KEY, "rsa-1"))
    config = tmp_path / "whepfan.toml"
    config.write_text(f'jwt_jwks = "{jwks}"\njwt_audience = "whepfan"\n')
    args = build_parser().parse_args(
        ["serve", "--jwt-public-key", str(key_file), "--jwt-leeway", "5", "--jwt-issuer", "app"]
    )
    given = {name: value for name, value in vars(args).items() if name.startswith("jwt_")}
    settings = Settings.resolve(
        cli=given, environ={"WHEPFAN_JWT_SECRET": SECRET}, config_path=config
    )
    assert settings.jwt_configured and settings.jwt_leeway == 5.0
    verifier = settings.http_options().jwt
    assert verifier is not None
    assert verifier.algorithms == {"HS256", "ES256", "RS256"}
    assert verifier.policy == JwtPolicy(audience="whepfan", issuer="app", leeway=5.0)
    token = jwt.encode(
        claims(aud="whepfan", iss="app"), RSA_KEY, algorithm="RS256", headers={"kid": "rsa-1"}
    )
    assert verifier.verify(token, NOW).role is Role.VIEW
    # No static publish token is made up when JWTs are configured...
    assert settings.with_generated_publish_token().publish_token is None
    # ...and without JWTs the old rule holds.
    assert Settings().with_generated_publish_token().publish_token is not None
    assert Settings().http_options().jwt is None


def test_unusable_jwt_settings_are_settings_errors(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="at least 32 bytes") as caught:
        Settings.resolve(cli={"jwt_secret": "tiny-secret"}, environ={})
    assert "tiny-secret" not in str(caught.value)  # secrets are never repeated
    with pytest.raises(SettingsError, match="0 to 300 seconds"):
        Settings.resolve(cli={"jwt_leeway": "3600"}, environ={})
    missing = Settings.resolve(cli={"jwt_public_key": str(tmp_path / "nope.pem")}, environ={})
    with pytest.raises(SettingsError, match="cannot read"):
        missing.http_options()
    private = tmp_path / "private.pem"
    private.write_bytes(
        EC_KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    settings = Settings.resolve(cli={"jwt_public_key": str(private)}, environ={})
    with pytest.raises(SettingsError, match="not a PEM public key"):
        settings.http_options()


def test_whepfan_serve_with_jwts_only() -> None:
    """``whepfan.server.run`` as ``whepfan serve --jwt-secret`` runs it: publishing and
    viewing take JWTs (real wall clock), and no static publish token was made up."""
    live = LiveServer(
        settings_for(publish_token=None, jwt_secret=SECRET, worker_packet_budget="none")
    )
    try:
        assert live.info is not None and live.info.publish_token is None
        expires = time.time() + 600
        publisher = bearer(hs256(role="publish", exp=expires))
        viewer = bearer(hs256(exp=expires))

        async def exercise() -> None:
            async with aiohttp.ClientSession(live.url) as http:
                async with http.post("/whip/live", data=WHIP_OFFER, headers=SDP) as response:
                    assert response.status == 401
                headers = {**publisher, **SDP}
                async with http.post("/whip/live", data=WHIP_OFFER, headers=headers) as response:
                    assert response.status == 201
                    publisher_url = response.headers["Location"]
                async with http.post("/whep/live", data=WHEP_OFFER, headers=SDP) as response:
                    assert response.status == 401
                headers = {**viewer, **SDP}
                async with http.post("/whep/live", data=WHEP_OFFER, headers=headers) as response:
                    assert response.status == 201
                async with http.delete(publisher_url, headers=viewer) as response:
                    assert response.status == 403
                async with http.delete(publisher_url, headers=publisher) as response:
                    assert response.status == 200

        asyncio.run(exercise())
    finally:
        live.close()


async def test_a_counter_offer_session_is_bound_like_any_other(client: TestClient) -> None:
    """WHEP draft-03 §4.2.2: the 406's Location is a session too; its answer (PATCH) and
    its DELETE take the credential that made it."""
    await publish(client)
    # Audio only, and no codec the publisher sends: the server counter-offers.
    no_common_codec = re.sub(
        r"a=rtpmap:\d+ (opus|red|G722|PCMU|PCMA|CN|telephone-event)/.*\r?\n",
        "",
        re.sub(r"m=video.*", "", WHEP_OFFER, flags=re.S),
    )
    response = await client.post("/whep/live", data=no_common_codec, headers={**VIEWER_A, **SDP})
    assert response.status == 406, await response.text()
    location = response.headers["Location"]
    answer = await response.text()
    await problem(await client.patch(location, data=answer, headers={**VIEWER_B, **SDP}), 403)
    await problem(await client.delete(location, headers=VIEWER_B), 403)
    assert (await client.delete(location, headers=VIEWER_A)).status == 200
