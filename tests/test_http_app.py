"""The WHIP/WHEP HTTP contract (issue 3), driven through a real aiohttp server.

The session layer is replaced here by ``ContractRouter``, a test double that does what
``whepfan.media.router.Router`` documents (errors, etags, counter-offers) with whepfan's real
SDP parser, so every status code, header, PATCH case, auth and CORS rule of the HTTP layer
is tested on its own. ``test_http_conformance.py`` runs the same surface over the real
router with aiortc peers.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import http.client
import re
import secrets
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import orjson
import pytest
from _paths import SDP_FIXTURES
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st

from whepfan.errors import Conflict, NotAcceptable, NotFound, ServiceUnavailable, Unprocessable
from whepfan.http import COUNTERS_KEY, HttpOptions, IceServer, create_app
from whepfan.protocol import sdp

FIXTURES = SDP_FIXTURES
WHEP_OFFER = (FIXTURES / "chromium-156-whep-recvonly-offer.sdp").read_text()
WHIP_OFFER = (FIXTURES / "chromium-156-whip-sendonly-offer.sdp").read_text()
SIMULCAST_OFFER = (FIXTURES / "chromium-156-whip-simulcast-offer.sdp").read_text()
PUBLISH_TOKEN = "pub-secret-token"
WALL_CLOCK = 1_700_000_000.0
STUN = IceServer(url="stun:stun.example.net:3478")
TURN = IceServer(
    url="turn:turn.example.net?transport=udp", shared_secret="s3cret", credential_ttl=600
)


# ---------------------------------------------------------------------------- test double


class Kind(enum.Enum):
    PUBLISHER = "publisher"
    VIEWER = "viewer"


@dataclass(eq=False)
class Ice:
    remote_ufrag: str | None


@dataclass(eq=False)
class FakeSession:
    id: str
    kind: Kind
    stream: str
    ice: Ice
    etag: str = field(default_factory=lambda: f'"{secrets.token_hex(8)}"')
    awaiting_answer: bool = False
    fragments: list[sdp.SdpFragment] = field(default_factory=list)
    restarts: int = 0


@dataclass(eq=False)
class FakeStream:
    codecs: set[str]
    publisher: FakeSession | None = None

    @property
    def live(self) -> bool:
        return self.publisher is not None


class ContractRouter:
    """The documented router contract, minus media (see the module docstring)."""

    def __init__(self, *, max_viewers: int = 100) -> None:
        self.streams: dict[str, FakeStream] = {}
        self.sessions: dict[str, FakeSession] = {}
        self.max_viewers = max_viewers
        self.fail_restart = False
        self.ended: list[tuple[str, str]] = []

    @property
    def viewer_count(self) -> int:
        return sum(s.kind is Kind.VIEWER for s in self.sessions.values())

    def _session(self, kind: Kind, stream: str, offer: sdp.SessionDescription) -> FakeSession:
        ufrag = offer.ice_ufrag or next((m.ice_ufrag for m in offer.media if m.ice_ufrag), None)
        session = FakeSession(secrets.token_urlsafe(24), kind, stream, Ice(ufrag))
        self.sessions[session.id] = session
        return session

    @staticmethod
    def _answer(offer: sdp.SessionDescription, direction: str) -> str:
        lines = ["v=0", "o=- 1 1 IN IP4 127.0.0.1", "s=-", "t=0 0", "a=ice-lite"]
        for section in offer.media:
            lines += [
                f"m={section.kind} 9 UDP/TLS/RTP/SAVPF 0",
                f"a=mid:{section.mid}",
                f"a={direction}",
                "a=candidate:1 1 udp 2130706431 192.0.2.1 8189 typ host",
                "a=end-of-candidates",
            ]
        return "\r\n".join(lines) + "\r\n"

    def publish(self, stream_name: str, offer_text: str, now: float) -> tuple[FakeSession, str]:
        stream = self.streams.get(stream_name)
        if stream is not None and stream.live:
            raise Conflict(f"stream {stream_name!r} already has a publisher", retry_after=5)
        offer = sdp.SessionDescription.parse(offer_text)
        sending = [m for m in offer.media if m.direction in ("sendonly", "sendrecv")]
        if not sending:
            raise Unprocessable("the offer sends no media")
        codecs = {c.name.lower() for m in sending for c in m.codecs}
        session = self._session(Kind.PUBLISHER, stream_name, offer)
        self.streams.setdefault(stream_name, FakeStream(codecs)).publisher = session
        return session, self._answer(offer, "recvonly")

    def view(self, stream_name: str, offer_text: str, now: float) -> tuple[FakeSession, str]:
        stream = self.streams.get(stream_name)
        if stream is None or not stream.live:
            raise Conflict(f"stream {stream_name!r} is not live", retry_after=5)
        if self.viewer_count >= self.max_viewers:
            raise ServiceUnavailable("no viewer capacity left", retry_after=10)
        offer = sdp.SessionDescription.parse(offer_text)
        offered = {c.name.lower() for m in offer.media for c in m.codecs}
        if not offered & stream.codecs:
            raise NotAcceptable("no codec in common")
        return self._session(Kind.VIEWER, stream_name, offer), self._answer(offer, "sendonly")

    def counter_offer(self, stream_name: str, now: float) -> tuple[FakeSession, str]:
        session = FakeSession(secrets.token_urlsafe(24), Kind.VIEWER, stream_name, Ice(None))
        session.awaiting_answer = True
        self.sessions[session.id] = session
        offer = sdp.SessionDescription.parse(WHIP_OFFER)
        return session, self._answer(offer, "sendonly")

    def accept_counter_answer(self, session_id: str, answer_text: str, now: float) -> None:
        session = self.get_session(session_id)
        if not session.awaiting_answer:
            raise Conflict("this session is not waiting for an answer")
        answer = sdp.SessionDescription.parse(answer_text)
        session.ice.remote_ufrag = answer.ice_ufrag
        session.awaiting_answer = False

    def trickle(self, session_id: str, fragment: sdp.SdpFragment, now: float) -> None:
        self.get_session(session_id).fragments.append(fragment)

    def restart_ice(self, session_id: str, fragment: sdp.SdpFragment, now: float) -> str:
        session = self.get_session(session_id)
        if self.fail_restart:
            raise Unprocessable("cannot restart ICE now")
        session.restarts += 1
        session.etag = f'"{secrets.token_hex(8)}"'
        # Like the real agent, the old remote ufrag stays current until a check verifies.
        return sdp.serialize_sdpfrag(
            "newufrag", "newpassword0123456789abcd", [], fragment.mid or "0"
        )

    def end_session(self, session_id: str, now: float, reason: str = "deleted") -> bool:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        self.ended.append((session_id, reason))
        stream = self.streams.get(session.stream)
        if stream is not None and stream.publisher is session:
            stream.publisher = None
        return True

    def get_session(self, session_id: str) -> FakeSession:
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound("no such session")
        return session


# ---------------------------------------------------------------------------- fixtures


def make_app(router: ContractRouter, **overrides: object) -> web.Application:
    values: dict[str, object] = {
        "publish_token": PUBLISH_TOKEN,
        "ice_servers": (STUN, TURN),
    }
    values.update(overrides)
    return create_app(
        router=router,
        clock=lambda: 100.0,
        options=HttpOptions(**values),  # type: ignore[arg-type]
        wall_clock=lambda: WALL_CLOCK,
    )


@pytest.fixture
def router() -> ContractRouter:
    return ContractRouter(max_viewers=2)


@pytest.fixture
async def client(router: ContractRouter) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(make_app(router))) as test_client:
        yield test_client


AUTH = {"Authorization": f"Bearer {PUBLISH_TOKEN}"}
SDP_HEADERS = {"Content-Type": "application/sdp"}
FRAG = "application/trickle-ice-sdpfrag"


async def publish(client: TestClient, stream: str = "live") -> tuple[str, str]:
    response = await client.post(
        f"/whip/{stream}", data=WHIP_OFFER, headers={**AUTH, **SDP_HEADERS}
    )
    assert response.status == 201, await response.text()
    return response.headers["Location"], response.headers["ETag"]


async def view(client: TestClient, stream: str = "live") -> tuple[str, str]:
    response = await client.post(f"/whep/{stream}", data=WHEP_OFFER, headers=SDP_HEADERS)
    assert response.status == 201, await response.text()
    return response.headers["Location"], response.headers["ETag"]


def trickle_body(ufrag: str = "hF/U", pwd: str | None = None, candidate: str | None = None) -> str:
    lines = [
        "a=ice-options:trickle ice2",
        "a=group:BUNDLE 0 1",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "a=mid:0",
        f"a=ice-ufrag:{ufrag}",
    ]
    if pwd is not None:
        lines.append(f"a=ice-pwd:{pwd}")
    lines.append(
        "a=candidate:" + (candidate or "1387637174 1 udp 2122260223 192.0.2.1 61764 typ host")
    )
    lines.append("a=end-of-candidates")
    return "\r\n".join(lines) + "\r\n"


async def assert_problem(response: object, status: int) -> dict[str, object]:
    assert response.status == status  # type: ignore[attr-defined]
    assert response.headers["Content-Type"] == "application/problem+json"  # type: ignore[attr-defined]
    body = orjson.loads(await response.read())  # type: ignore[attr-defined]
    assert body["status"] == status and isinstance(body["detail"], str) and body["detail"]
    return body


# ---------------------------------------------------------------------------- WHIP


async def test_whip_post_answers_201_with_location_etag_and_ice_server_links(
    client: TestClient, router: ContractRouter
) -> None:
    response = await client.post("/whip/live", data=WHIP_OFFER, headers={**AUTH, **SDP_HEADERS})
    assert response.status == 201
    assert response.headers["Content-Type"] == "application/sdp"
    assert "a=recvonly" in await response.text()
    location = response.headers["Location"]
    session = next(iter(router.sessions.values()))
    assert location == f"/whip/live/{session.id}"  # absolute path
    assert response.headers["ETag"] == session.etag
    assert re.fullmatch(r'"[^"]+"', response.headers["ETag"])  # strong (RFC 9110 §8.8.3)
    assert response.headers["Accept-Patch"] == FRAG
    links = response.headers.getall("Link")
    assert links[0] == '<stun:stun.example.net:3478>; rel="ice-server"'
    # TURN REST credentials (draft-uberti-behave-turn-rest-00 §2.2): expiry = now + ttl.
    expiry = int(WALL_CLOCK) + 600
    username, password = TURN.credentials(WALL_CLOCK) or ("", "")
    assert username == f"{expiry}:whepfan"
    assert links[1] == (
        f'<turn:turn.example.net?transport=udp>; rel="ice-server"; username="{username}"; '
        f'credential="{password}"; credential-type="password"'
    )


async def test_second_publisher_gets_409_with_retry_after(client: TestClient) -> None:
    await publish(client)
    response = await client.post("/whip/live", data=WHIP_OFFER, headers={**AUTH, **SDP_HEADERS})
    body = await assert_problem(response, 409)
    assert response.headers["Retry-After"] == "5"
    assert "publisher" in str(body["detail"])


async def test_publisher_takeover_replaces_the_live_publisher(router: ContractRouter) -> None:
    async with TestClient(TestServer(make_app(router, publisher_takeover=True))) as client:
        first, _ = await publish(client)
        second, _ = await publish(client)
        assert first != second
        assert router.ended == [(first.rsplit("/", 1)[1], "taken-over")]
        # The replaced publisher's own DELETE still answers 200, once (tombstones.py).
        assert (await client.delete(first, headers=AUTH)).status == 200
        assert (await client.delete(first, headers=AUTH)).status == 404
        assert (await client.delete(second, headers=AUTH)).status == 200


async def test_takeover_keeps_the_live_publisher_when_the_new_offer_is_garbage(
    router: ContractRouter,
) -> None:
    async with TestClient(TestServer(make_app(router, publisher_takeover=True))) as client:
        first, _ = await publish(client)
        response = await client.post("/whip/live", data="junk", headers={**AUTH, **SDP_HEADERS})
        await assert_problem(response, 400)
        assert (await client.get(first)).status == 204


async def test_whip_offer_without_sending_media_is_422(client: TestClient) -> None:
    response = await client.post("/whip/live", data=WHEP_OFFER, headers={**AUTH, **SDP_HEADERS})
    await assert_problem(response, 422)


async def test_simulcast_fixture_is_accepted(client: TestClient) -> None:
    response = await client.post("/whip/sim", data=SIMULCAST_OFFER, headers={**AUTH, **SDP_HEADERS})
    assert response.status == 201


# ---------------------------------------------------------------------------- auth


INVALID_TOKEN_CHALLENGE = (
    'Bearer realm="whepfan", error="invalid_token", '
    'error_description="the bearer token is not valid for this resource"'
)


@pytest.mark.parametrize(
    ("authorization", "status", "challenge"),
    [
        (None, 401, 'Bearer realm="whepfan"'),
        ("Bearer wrong", 401, INVALID_TOKEN_CHALLENGE),
        ("Bearer undefined", 401, INVALID_TOKEN_CHALLENGE),
        (f"Basic {PUBLISH_TOKEN}", 401, 'Bearer realm="whepfan"'),
        (f"Bearer {PUBLISH_TOKEN}", 201, None),
        (f"bearer   {PUBLISH_TOKEN}", 201, None),
        (PUBLISH_TOKEN, 201, None),  # raw token without the prefix
    ],
)
async def test_whip_post_auth(
    client: TestClient, authorization: str | None, status: int, challenge: str | None
) -> None:
    headers = dict(SDP_HEADERS)
    if authorization is not None:
        headers["Authorization"] = authorization
    response = await client.post("/whip/live", data=WHIP_OFFER, headers=headers)
    if status == 401:
        await assert_problem(response, 401)
        assert response.headers["WWW-Authenticate"] == challenge
    else:
        assert response.status == status


async def test_token_in_query_string_is_never_authentication(client: TestClient) -> None:
    for name in ("token", "access_token", "auth"):
        response = await client.post(
            f"/whip/live?{name}={PUBLISH_TOKEN}", data=WHIP_OFFER, headers=SDP_HEADERS
        )
        await assert_problem(response, 401)


async def test_session_patch_and_delete_need_the_token(client: TestClient) -> None:
    location, etag = await publish(client)
    headers = {"Content-Type": FRAG, "If-Match": etag}
    await assert_problem(await client.patch(location, data=trickle_body(), headers=headers), 401)
    await assert_problem(await client.delete(location), 401)
    # The unauthenticated requests changed nothing.
    assert (await client.delete(location, headers=AUTH)).status == 200


async def test_viewing_is_open_without_view_token_and_closed_with_one(
    router: ContractRouter,
) -> None:
    async with TestClient(TestServer(make_app(router))) as client:
        await publish(client)
        await view(client)
    async with TestClient(TestServer(make_app(router, view_token="v1"))) as client:
        response = await client.post("/whep/live", data=WHEP_OFFER, headers=SDP_HEADERS)
        await assert_problem(response, 401)
        response = await client.post(
            "/whep/live", data=WHEP_OFFER, headers={**SDP_HEADERS, "Authorization": "Bearer v1"}
        )
        assert response.status == 201
        # The publish token is not a view token: valid, but not for this (RFC 6750 §3.1).
        response = await client.post("/whep/live", data=WHEP_OFFER, headers={**SDP_HEADERS, **AUTH})
        await assert_problem(response, 403)
        assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]


# ---------------------------------------------------------------------------- WHEP POST


async def test_whep_post_answers_201_sendonly(client: TestClient) -> None:
    await publish(client)
    response = await client.post("/whep/live", data=WHEP_OFFER, headers=SDP_HEADERS)
    assert response.status == 201
    assert response.headers["Content-Type"] == "application/sdp"
    answer = await response.text()
    assert "a=sendonly" in answer and "a=end-of-candidates" in answer
    assert response.headers["Location"].startswith("/whep/live/")
    assert len(response.headers.getall("Link")) == 2


async def test_whep_without_live_publisher_is_409_with_retry_after(client: TestClient) -> None:
    response = await client.post("/whep/nothing", data=WHEP_OFFER, headers=SDP_HEADERS)
    await assert_problem(response, 409)
    assert response.headers["Retry-After"] == "5"


async def test_whep_over_capacity_is_503_with_retry_after(
    client: TestClient, router: ContractRouter
) -> None:
    await publish(client)
    await view(client)
    await view(client)
    response = await client.post("/whep/live", data=WHEP_OFFER, headers=SDP_HEADERS)
    await assert_problem(response, 503)
    assert response.headers["Retry-After"] == "10"
    assert router.viewer_count == 2  # nothing leaked


async def test_whep_406_counter_offer_round_trip(
    client: TestClient, router: ContractRouter
) -> None:
    await publish(client)
    only_g722 = re.sub(r"m=video.*", "", WHEP_OFFER, flags=re.S).replace(
        "a=rtpmap:111 opus/48000/2", "a=rtpmap:111 G7221/16000"
    )
    only_g722 = re.sub(
        r"a=rtpmap:\d+ (opus|red|G722|PCMU|PCMA|CN|telephone-event)/.*\r?\n", "", only_g722
    )
    response = await client.post("/whep/live", data=only_g722, headers=SDP_HEADERS)
    assert response.status == 406
    content_type = response.headers["Content-Type"]
    match = re.fullmatch(r'application/sdp; valid-until="([^"]+)"', content_type)
    assert match, content_type
    # WHEP draft-03 §4.2.2: valid-until is an HTTP-date; ours is now + the 30 s default.
    valid_until = email.utils.parsedate_to_datetime(match.group(1)).timestamp()
    assert valid_until == WALL_CLOCK + 30
    assert "a=sendonly" in await response.text()
    location = response.headers["Location"]
    assert location.startswith("/whep/live/")
    session_id = location.rsplit("/", 1)[1]
    assert router.sessions[session_id].awaiting_answer
    # Malformed answer -> 4xx, session still waiting.
    bad = await client.patch(location, data="nonsense", headers=SDP_HEADERS)
    await assert_problem(bad, 400)
    # The player's answer -> 204.
    answer = WHEP_OFFER.replace("a=recvonly", "a=recvonly")
    good = await client.patch(location, data=answer, headers=SDP_HEADERS)
    assert good.status == 204
    assert not router.sessions[session_id].awaiting_answer
    # Answering twice is a conflict, not a crash.
    await assert_problem(await client.patch(location, data=answer, headers=SDP_HEADERS), 409)


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("text/plain", WHEP_OFFER, 415),
        ("application/json", '{"sdp": "v=0"}', 415),
        (None, WHEP_OFFER, 415),
        # (An empty body asks for a server offer: tests/test_server_offer.py.)
        ("application/sdp", "v=0\r\nthis is not sdp\r\n", 400),
    ],
)
async def test_bad_post_bodies_are_4xx_problems(
    client: TestClient, content_type: str | None, body: str, status: int
) -> None:
    await publish(client)
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = await client.post("/whep/live", data=body.encode(), headers=headers)
    await assert_problem(response, status)
    if status == 415:
        assert response.headers["Accept-Post"] == "application/sdp"


async def test_non_utf8_and_oversized_bodies(client: TestClient) -> None:
    await publish(client)
    response = await client.post("/whep/live", data=b"v=0\r\n\xff\xfe", headers=SDP_HEADERS)
    await assert_problem(response, 400)
    response = await client.post("/whep/live", data=b"v" * 200_000, headers=SDP_HEADERS)
    await assert_problem(response, 413)


# ---------------------------------------------------------------------------- PATCH


@pytest.fixture
async def viewer(client: TestClient) -> tuple[str, str]:
    await publish(client)
    return await view(client)


def frag_headers(**extra: str) -> dict[str, str]:
    return {"Content-Type": FRAG, **extra}


@pytest.mark.parametrize("if_match", ["CURRENT", "*", '"*"', " * ", 'W/"x", CURRENT'])
async def test_trickle_with_matching_if_match_is_204_without_etag(
    client: TestClient, router: ContractRouter, viewer: tuple[str, str], if_match: str
) -> None:
    location, etag = viewer
    response = await client.patch(
        location,
        data=trickle_body(),
        headers=frag_headers(**{"If-Match": if_match.replace("CURRENT", etag)}),
    )
    assert response.status == 204
    assert "ETag" not in response.headers
    assert await response.read() == b""
    session = router.sessions[location.rsplit("/", 1)[1]]
    assert len(session.fragments) == 1 and session.fragments[0].complete
    assert session.restarts == 0


@pytest.mark.parametrize("if_match", ['"stale"', 'W/"CURRENT"', 'garbage,,"', ""])
async def test_trickle_with_other_etag_is_412(
    client: TestClient, viewer: tuple[str, str], if_match: str
) -> None:
    location, etag = viewer
    value = if_match.replace('"CURRENT"', etag)
    headers = frag_headers(**{"If-Match": value})
    response = await client.patch(location, data=trickle_body(), headers=headers)
    if value.strip():
        await assert_problem(response, 412)
    else:
        assert response.status == 204  # an empty If-Match counts as absent


async def test_trickle_without_if_match_is_accepted_by_default(
    client: TestClient, viewer: tuple[str, str]
) -> None:
    location, _ = viewer
    assert (await client.patch(location, data=trickle_body(), headers=frag_headers())).status == 204


async def test_strict_etag_mode_answers_428_without_if_match(router: ContractRouter) -> None:
    async with TestClient(TestServer(make_app(router, strict_etag=True))) as client:
        await publish(client)
        location, etag = await view(client)
        response = await client.patch(location, data=trickle_body(), headers=frag_headers())
        await assert_problem(response, 428)
        response = await client.patch(
            location, data=trickle_body(), headers=frag_headers(**{"If-Match": etag})
        )
        assert response.status == 204


async def test_etag_request_header_is_read_as_if_match(
    client: TestClient, viewer: tuple[str, str]
) -> None:
    location, etag = viewer
    response = await client.patch(location, data=trickle_body(), headers=frag_headers(ETag='"old"'))
    await assert_problem(response, 412)
    response = await client.patch(location, data=trickle_body(), headers=frag_headers(ETag=etag))
    assert response.status == 204
    # If-Match wins over ETag when both are present.
    headers = frag_headers(ETag='"old"', **{"If-Match": etag})
    assert (await client.patch(location, data=trickle_body(), headers=headers)).status == 204


@pytest.mark.parametrize(
    "body",
    [
        '{"candidate": "candidate:1 1 udp 1 192.0.2.1 1 typ host", "sdpMid": "0"}',
        '[{"candidate": ""}]',
        trickle_body(candidate="1 0 udp 2122260223 192.0.2.1 61764 typ host"),  # component 0
        trickle_body(candidate="1 1 udp 2122260223 f00d.local 61764 typ host"),  # mDNS
        trickle_body(candidate="1 1 sctp 2122260223 192.0.2.1 61764 typ host"),
    ],
)
async def test_unusable_trickle_content_is_ignored(
    client: TestClient, viewer: tuple[str, str], body: str
) -> None:
    location, _ = viewer
    assert (await client.patch(location, data=body, headers=frag_headers())).status == 204


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        (FRAG, "this is not an sdpfrag", 400),
        (FRAG, "", 400),
        (FRAG, "{not json", 400),
        ("text/plain", trickle_body(), 415),
    ],
)
async def test_bad_patch_bodies_are_4xx(
    client: TestClient, viewer: tuple[str, str], content_type: str, body: str, status: int
) -> None:
    location, _ = viewer
    response = await client.patch(location, data=body, headers={"Content-Type": content_type})
    await assert_problem(response, status)
    if status == 415:
        assert FRAG in response.headers["Accept-Patch"]


async def test_whip_session_does_not_take_sdp_patches(client: TestClient) -> None:
    location, _ = await publish(client)
    response = await client.patch(location, data=WHIP_OFFER, headers={**AUTH, **SDP_HEADERS})
    await assert_problem(response, 415)
    assert response.headers["Accept-Patch"] == FRAG


async def test_ice_restart_answers_200_with_sdpfrag_and_new_etag(
    client: TestClient, router: ContractRouter, viewer: tuple[str, str]
) -> None:
    location, etag = viewer
    session = router.sessions[location.rsplit("/", 1)[1]]
    body = trickle_body(ufrag="ysXw", pwd="vw5LmwG4y/e6dPP/zAP9Gp5k")
    response = await client.patch(location, data=body, headers=frag_headers(**{"If-Match": "*"}))
    assert response.status == 200
    assert response.headers["Content-Type"] == FRAG
    new_etag = response.headers["ETag"]
    assert new_etag != etag and new_etag == session.etag
    fragment = sdp.parse_sdpfrag(await response.text())
    assert fragment.ufrag == "newufrag" and fragment.pwd and fragment.complete
    assert session.restarts == 1
    # Trickling on the new generation is a trickle, not another restart.
    response = await client.patch(
        location, data=body, headers=frag_headers(**{"If-Match": new_etag})
    )
    assert response.status == 204
    assert session.restarts == 1
    # The old ETag no longer matches.
    response = await client.patch(location, data=body, headers=frag_headers(**{"If-Match": etag}))
    await assert_problem(response, 412)


async def test_ice_restart_without_pwd_is_400(client: TestClient, viewer: tuple[str, str]) -> None:
    location, _ = viewer
    response = await client.patch(
        location, data=trickle_body(ufrag="ysXw"), headers=frag_headers(**{"If-Match": "*"})
    )
    await assert_problem(response, 400)


async def test_failed_ice_restart_is_4xx_and_keeps_the_session(
    client: TestClient, router: ContractRouter, viewer: tuple[str, str]
) -> None:
    location, etag = viewer
    router.fail_restart = True
    body = trickle_body(ufrag="ysXw", pwd="vw5LmwG4y/e6dPP/zAP9Gp5k")
    response = await client.patch(location, data=body, headers=frag_headers(**{"If-Match": "*"}))
    await assert_problem(response, 422)
    assert (await client.get(location)).status == 204
    # The old ICE session and its ETag are still the current ones.
    response = await client.patch(
        location, data=trickle_body(), headers=frag_headers(**{"If-Match": etag})
    )
    assert response.status == 204


async def test_patch_on_unknown_or_foreign_session_is_404(
    client: TestClient, viewer: tuple[str, str]
) -> None:
    location, _ = viewer
    session_id = location.rsplit("/", 1)[1]
    for url in (f"/whep/live/{'A' * 32}", f"/whep/other/{session_id}", f"/whip/live/{session_id}"):
        response = await client.patch(url, data=trickle_body(), headers={**AUTH, **frag_headers()})
        await assert_problem(response, 404)


# ---------------------------------------------------------------------------- DELETE/GET/HEAD


async def test_delete_is_200_then_404_and_ignores_etags(
    client: TestClient, router: ContractRouter, viewer: tuple[str, str]
) -> None:
    location, _ = viewer
    response = await client.delete(location, headers={"If-Match": '"stale"', "ETag": '"x"'})
    assert response.status == 200
    assert router.ended[-1] == (location.rsplit("/", 1)[1], "deleted")
    await assert_problem(await client.delete(location), 404)
    await assert_problem(await client.get(location), 404)


async def test_get_and_head(client: TestClient) -> None:
    location, _ = await publish(client)
    for url in ("/whip/live", "/whep/live", location):
        response = await client.get(url)
        assert response.status == 204 and await response.read() == b""
    for url in ("/whip/live", "/whep/live"):
        response = await client.head(url)
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/sdp"
        assert await response.read() == b""


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/whip/live"),
        ("DELETE", "/whep/live"),
        ("PATCH", "/whep/live"),
        ("PUT", "/whep/live/" + "a" * 32),
        ("POST", "/whep/live/" + "a" * 32),
    ],
)
async def test_unsupported_methods_are_405_with_allow(
    client: TestClient, method: str, path: str
) -> None:
    response = await client.request(method, path)
    await assert_problem(response, 405)
    assert "OPTIONS" in response.headers["Allow"]


async def test_unknown_paths_are_404_problems(client: TestClient) -> None:
    # "/" is the stream list page (pages.py); everything else here matches no route.
    for path in ("/nothing", "/whip", "/whip/a/short"):
        await assert_problem(await client.get(path), 404)
    # A segment that is not a stream name is a 400 naming the rule (names.py), not a 404.
    for path in ("/whep/bad%20name", "/whep/" + "x" * 200):
        await assert_problem(await client.get(path), 400)


# ---------------------------------------------------------------------------- OPTIONS / CORS


async def test_options_on_endpoint_and_session(client: TestClient) -> None:
    location, _ = await publish(client)
    response = await client.options("/whep/live")
    assert response.status == 200
    assert response.headers["Accept-Post"] == "application/sdp"
    # POST to the endpoint, and PATCH/DELETE permitted for clients that check them here.
    for method in ("POST", "PATCH", "DELETE"):
        assert method in response.headers["Access-Control-Allow-Methods"]
    # Viewing is open, so a plain OPTIONS hands out the ice-server Links (RFC 9725 §4.6).
    assert len(response.headers.getall("Link")) == 2
    # Publishing is not: no TURN credentials without the token...
    assert "Link" not in (await client.options("/whip/live")).headers
    # ...and with it, the Links are there.
    assert len((await client.options("/whip/live", headers=AUTH)).headers.getall("Link")) == 2
    response = await client.options(location)
    assert response.status == 200
    assert response.headers["Accept-Patch"] == FRAG
    assert {"PATCH", "DELETE"} <= set(response.headers["Access-Control-Allow-Methods"].split(", "))


async def test_cors_preflight_needs_no_auth_and_allows_the_whip_headers(client: TestClient) -> None:
    preflight = {
        "Origin": "https://player.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    for path in ("/whip/live", "/whep/live", "/whip/live/" + "a" * 32):
        response = await client.options(path, headers=preflight)
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        allowed = {h.strip() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"Authorization", "Content-Type", "If-Match", "ETag"} <= allowed
        assert "Link" not in response.headers  # RFC 9725 §4.6: not on a preflight


async def test_cors_headers_on_success_and_errors(client: TestClient) -> None:
    origin = {"Origin": "https://player.example"}
    ok = await client.post("/whip/live", data=WHIP_OFFER, headers={**AUTH, **SDP_HEADERS, **origin})
    err = await client.post("/whep/none", data=WHEP_OFFER, headers={**SDP_HEADERS, **origin})
    for response in (ok, err):
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        exposed = {h.strip() for h in response.headers["Access-Control-Expose-Headers"].split(",")}
        assert {"Location", "ETag", "Link", "Accept-Patch"} <= exposed


# ---------------------------------------------------------------------------- no 5xx


async def test_unexpected_router_exception_is_logged_500_and_counted(
    router: ContractRouter, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("bug")

    router.trickle = broken  # type: ignore[method-assign]
    app = make_app(router)
    async with TestClient(TestServer(app)) as client:
        await publish(client)
        location, _ = await view(client)
        response = await client.patch(location, data=trickle_body(), headers=frag_headers())
        body = await assert_problem(response, 500)
        assert "bug" not in str(body)  # no internals leak
    assert app[COUNTERS_KEY]["http_500"] == 1
    assert "failed" in caplog.text and "RuntimeError" in caplog.text


class ThreadedServer:
    """The app on a real 127.0.0.1 port in a background loop, for synchronous fuzzing."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = self.runner.addresses[0][1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def request(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture(scope="module")
def fuzz_target() -> Iterator[tuple[ThreadedServer, ContractRouter, dict[str, str]]]:
    router = ContractRouter(max_viewers=1_000_000)
    server = ThreadedServer(make_app(router))
    auth = {"Authorization": PUBLISH_TOKEN, "Content-Type": "application/sdp"}
    assert server.request("POST", "/whip/live", WHIP_OFFER.encode(), auth) == 201
    publisher = next(iter(router.sessions.values()))
    sessions = {"publisher": f"/whip/live/{publisher.id}"}
    yield server, router, sessions
    server.close()


_header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
_content_types = st.sampled_from(
    [
        "application/sdp",
        FRAG,
        "application/json",
        "text/plain",
        "application/sdp; charset=utf-8",
        "",
        'application/trickle-ice-sdpfrag; x="y"',
    ]
)
_sdp_like = st.lists(
    st.sampled_from(
        [
            "v=0",
            "o=- 1 1 IN IP4 0.0.0.0",
            "s=-",
            "t=0 0",
            "m=audio 9 UDP/TLS/RTP/SAVPF 111",
            "m=video 0 UDP/TLS/RTP/SAVPF 96",
            "a=mid:0",
            "a=ice-ufrag:abcd",
            "a=ice-pwd:x",
            "a=candidate:1 1 udp 1 1.2.3.4 5 typ host",
            "a=candidate:1 0 udp 1 x 5 typ host",
            "a=end-of-candidates",
            "a=rtpmap:111 opus/48000/2",
            "a=sendonly",
            "a=recvonly",
            "a=group:BUNDLE 0",
            "a=fingerprint:sha-256 00",
            "a=setup:actpass",
            "a=",
            "x",
            "{}",
        ]
    ),
    max_size=15,
).map("\r\n".join)
_bodies = st.one_of(
    st.binary(max_size=300), st.text(max_size=300).map(str.encode), _sdp_like.map(str.encode)
)


@given(
    target=st.sampled_from(
        [
            "POST /whip/live",
            "POST /whep/live",
            "POST /whip/fresh",
            "PATCH publisher",
            "DELETE /whep/live/" + "b" * 32,
            "OPTIONS /whep/live",
            "PUT /whip/live",
        ]
    ),
    body=_bodies,
    content_type=_content_types,
    if_match=st.one_of(st.none(), _header_value),
    authorization=st.one_of(st.none(), _header_value, st.just(PUBLISH_TOKEN)),
)
def test_fuzzed_requests_never_get_5xx(
    fuzz_target: tuple[ThreadedServer, ContractRouter, dict[str, str]],
    target: str,
    body: bytes,
    content_type: str,
    if_match: str | None,
    authorization: str | None,
) -> None:
    server, _router, sessions = fuzz_target
    method, path = target.split(" ")
    path = sessions.get(path, path)
    headers = {"Content-Type": content_type}
    if if_match is not None:
        headers["If-Match"] = if_match
    if authorization is not None:
        headers["Authorization"] = authorization
    status = server.request(method, path, body, headers)
    assert 200 <= status < 500 and status != 503
    assert server.app[COUNTERS_KEY]["http_500"] == 0
