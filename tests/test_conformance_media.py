"""WHIP/WHEP conformance with media: real aiortc publishers and viewers talk HTTP to a
running ``whepfan serve`` (``whepfan.server.run`` on 127.0.0.1) and must decode frames.

Each test names the spec rule it checks (WHEP draft-ietf-wish-whep-03, RFC 9725 WHIP).
The HTTP-only rules are also tested exhaustively, against the same server, in
tests/test_http_conformance.py and, against a contract double, in tests/test_http_app.py.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from _peers import (
    DecodingViewer,
    accept_answer,
    new_peer,
    only_loopback_candidates,
    sending_peer,
    wait_until,
)
from _server import TOKEN, LiveServer, settings_for
from _signalling import AUTH, SDP, exchange
from aiortc import RTCSessionDescription

from whepfan.protocol import sdp

FRAG = {"Content-Type": "application/trickle-ice-sdpfrag"}


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_loopback_candidates(monkeypatch)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = LiveServer(settings_for(max_viewers="4"))
    yield live
    live.close()


@pytest.fixture
async def http(server: LiveServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=server.url) as session:
        yield session


class HttpPublisher:
    """An aiortc WHIP publisher (moving pattern + tone) over HTTP."""

    def __init__(self, http: aiohttp.ClientSession, stream: str) -> None:
        self.http, self.stream = http, stream
        self.pc = new_peer()
        self.location = ""

    async def start(self) -> aiohttp.ClientResponse:
        await sending_peer(self.pc)
        response, answer = await exchange(
            self.http, f"/whip/{self.stream}", self.pc.localDescription.sdp, AUTH
        )
        self.location = response.headers["Location"]
        await accept_answer(self.pc, answer)
        return response

    async def stop(self, *, delete: bool = True) -> None:
        if delete:
            async with self.http.delete(self.location, headers=AUTH) as response:
                assert response.status == 200
        await self.pc.close()


class HttpViewer(DecodingViewer):
    """A decoding aiortc WHEP viewer over HTTP."""

    def __init__(self, http: aiohttp.ClientSession, stream: str) -> None:
        super().__init__()
        self.http, self.stream = http, stream
        self.location = ""

    async def start(self) -> aiohttp.ClientResponse:
        response, answer = await exchange(self.http, f"/whep/{self.stream}", await self.offer())
        self.location = response.headers["Location"]
        await self.accept(answer)
        return response

    async def stop(self, *, delete: bool = True) -> None:
        if delete and self.location:
            async with self.http.delete(self.location) as response:
                assert response.status == 200
        await self.close()


async def test_whip_and_whep_201_headers_and_answers_then_frames_decode(
    http: aiohttp.ClientSession,
) -> None:
    """WHIP RFC 9725 §4.2 / WHEP §4.2.1: 201, application/sdp answer with every server
    candidate and end-of-candidates (§4.4.2), absolute-path Location, strong ETag, the
    extension Links; then media really flows to the viewer."""
    publisher = HttpPublisher(http, "c-basic")
    viewer = HttpViewer(http, "c-basic")
    try:
        whip = await publisher.start()
        assert whip.headers["Content-Type"].startswith("application/sdp")
        assert publisher.location.startswith("/whip/c-basic/")
        assert re.fullmatch(r'"[^"]+"', whip.headers["ETag"])
        whep = await viewer.start()
        answer = sdp.SessionDescription.parse(await whep.text())
        assert all(m.direction == "sendonly" for m in answer.media if not m.rejected)
        assert any(m.candidates for m in answer.media) and answer.media[0].end_of_candidates
        assert viewer.location.startswith("/whep/c-basic/")
        assert len(viewer.location.rsplit("/", 1)[1]) >= 22  # >= 128 bits, URL-safe base64
        links = whep.headers.getall("Link", [])
        assert any("urn:ietf:params:whep:ext:core:server-sent-events" in link for link in links)
        assert any("urn:ietf:params:whep:ext:core:layer" in link for link in links)
        await viewer.wait_frames(15)
        assert await wait_until(lambda: viewer.audio_frames > 0)
    finally:
        await viewer.stop()
        await publisher.stop()


async def test_delete_frees_the_session_and_later_requests_get_404(
    http: aiohttp.ClientSession, server: LiveServer
) -> None:
    """WHEP §4.3: DELETE ends the session (200), the resource is gone afterwards (404)."""
    publisher = HttpPublisher(http, "c-delete")
    viewer = HttpViewer(http, "c-delete")
    try:
        await publisher.start()
        await viewer.start()
        await viewer.wait_frames(3)
        async with http.delete(viewer.location) as response:
            assert response.status == 200
        for method in ("DELETE", "PATCH"):
            async with http.request(method, viewer.location, headers=FRAG, data="") as response:
                assert response.status == 404
                assert response.headers["Content-Type"].startswith("application/problem+json")
        frames = len(viewer.video_frames)
        await asyncio.sleep(1.0)
        assert len(viewer.video_frames) - frames <= 2  # media stopped with the session
    finally:
        await viewer.stop(delete=False)
        await publisher.stop()


async def test_406_counter_offer_round_trip_then_frames_decode(
    http: aiohttp.ClientSession,
) -> None:
    """WHEP §4.2.2: an offer with no codec the stream carries gets 406 with the server's
    own offer (application/sdp; valid-until) and a Location; the PATCHed recvonly answer
    gets 204 and the viewer plays."""
    publisher = HttpPublisher(http, "c-406")
    viewer = HttpViewer(http, "c-406")
    try:
        await publisher.start()  # aiortc publishes VP8
        h264_only = await viewer.offer(video_codec="H264")
        async with http.post("/whep/c-406", data=h264_only, headers=SDP) as response:
            assert response.status == 406
            content_type = response.headers["Content-Type"]
            assert content_type.startswith("application/sdp") and "valid-until=" in content_type
            location = response.headers["Location"]
            counter_offer = await response.text()
        assert "a=sendonly" in counter_offer and "VP8/90000" in counter_offer
        # The client answers the server's offer (a fresh peer: aiortc has no rollback).
        await viewer.pc.close()
        viewer.pc = new_peer()
        viewer.pc.on("track", viewer.on_track)
        await viewer.pc.setRemoteDescription(RTCSessionDescription(counter_offer, "offer"))
        await viewer.pc.setLocalDescription(await viewer.pc.createAnswer())
        async with http.patch(
            location, data=viewer.pc.localDescription.sdp, headers=SDP
        ) as response:
            assert response.status == 204, await response.text()
        viewer.location = location
        await viewer.wait_frames(10)
    finally:
        await viewer.stop()
        await publisher.stop()


async def test_publisher_leaves_and_returns_while_viewers_keep_decoding(
    http: aiohttp.ClientSession,
) -> None:
    """RFC 9725 §4.2 DELETE ends the publication; viewers stay connected and resume when a
    publisher returns on the same stream (the issue's continuity requirement)."""
    first = HttpPublisher(http, "c-return")
    viewer = HttpViewer(http, "c-return")
    second = HttpPublisher(http, "c-return")
    try:
        await first.start()
        await viewer.start()
        await viewer.wait_frames(10)
        await first.stop()
        await asyncio.sleep(0.5)
        async with http.get(viewer.location) as response:
            assert response.status // 100 == 2  # the viewer's session outlived the publisher
        before = len(viewer.video_frames)
        await second.start()
        await viewer.wait_frames(before + 10)
    finally:
        await viewer.stop()
        await second.stop()


async def test_second_publisher_409_and_not_live_409_with_retry_after(
    http: aiohttp.ClientSession,
) -> None:
    """RFC 9725: one publisher per stream (409); WHEP §4.2.8: not live -> 409 + Retry-After."""
    viewer = HttpViewer(http, "c-409")
    async with http.post("/whep/c-409", data=await viewer.offer(), headers=SDP) as response:
        assert response.status == 409 and int(response.headers["Retry-After"]) > 0
    await viewer.stop(delete=False)
    publisher = HttpPublisher(http, "c-409")
    intruder = HttpPublisher(http, "c-409")
    try:
        await publisher.start()
        await intruder.pc.setLocalDescription(await intruder.pc.createOffer())
        offer = await _publisher_offer()
        async with http.post("/whip/c-409", data=offer, headers={**AUTH, **SDP}) as response:
            assert response.status == 409
    finally:
        await intruder.pc.close()
        await publisher.stop()


async def _publisher_offer() -> str:
    pc = await sending_peer(audio=False)
    offer: str = pc.localDescription.sdp
    await pc.close()
    return offer


async def test_capacity_503_with_retry_after_and_no_leaked_session(
    http: aiohttp.ClientSession, server: LiveServer
) -> None:
    """WHEP §4.6: overload -> 503 + Retry-After; a refused request leaves no session."""
    publisher = HttpPublisher(http, "c-503")
    viewers = [HttpViewer(http, "c-503") for _ in range(4)]
    extra = HttpViewer(http, "c-503")
    try:
        await publisher.start()
        for viewer in viewers:  # the server allows 4 viewers
            await viewer.start()
        async with http.post("/whep/c-503", data=await extra.offer(), headers=SDP) as response:
            assert response.status == 503 and int(response.headers["Retry-After"]) > 0
        async with http.get("/api/streams/c-503") as response:
            assert (await response.json())["viewers"] == 4
        await viewers[0].wait_frames(3)
    finally:
        await extra.stop(delete=False)
        for viewer in viewers:
            await viewer.stop()
        await publisher.stop()


async def test_auth_rules(http: aiohttp.ClientSession) -> None:
    """WHEP §4.8 / RFC 9725 §4.7 bearer tokens: missing or wrong -> 401 + WWW-Authenticate;
    a raw token (no "Bearer ") is accepted; a token in the query string never is."""
    offer = await _publisher_offer()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer undefined"}):
        async with http.post("/whip/c-auth", data=offer, headers={**headers, **SDP}) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    async with http.post(f"/whip/c-auth?token={TOKEN}", data=offer, headers=SDP) as response:
        assert response.status == 401
    async with http.post(
        "/whip/c-auth", data=offer, headers={"Authorization": TOKEN, **SDP}
    ) as response:
        assert response.status == 201
        location = response.headers["Location"]
    async with http.delete(location) as response:
        assert response.status == 401  # the session URL alone is not the credential
    async with http.delete(location, headers=AUTH) as response:
        assert response.status == 200


async def test_cors_preflight_and_exposed_headers(http: aiohttp.ClientSession) -> None:
    """WHEP §4.3 / Fetch: preflight answered without auth; the headers a cross-origin
    player needs are allowed and exposed."""
    preflight = {
        "Origin": "https://player.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    async with http.options("/whip/c-cors", headers=preflight) as response:
        assert response.status == 200
        allowed = response.headers["Access-Control-Allow-Headers"].lower()
        for header in ("authorization", "content-type", "if-match", "etag"):
            assert header in allowed
        assert "PATCH" in response.headers["Access-Control-Allow-Methods"]
    publisher = HttpPublisher(http, "c-cors")
    try:
        response = await publisher.start()
        exposed = response.headers["Access-Control-Expose-Headers"].lower()
        for header in ("location", "etag", "link", "accept-patch"):
            assert header in exposed
    finally:
        await publisher.stop()


async def test_patch_trickle_etag_rules_and_ice_restart_keep_media_flowing(
    http: aiohttp.ClientSession,
) -> None:
    """WHEP §4.4: trickle -> 204 without ETag; a wrong If-Match -> 412; the `ETag:` request
    header is read as If-Match; an ICE restart (`If-Match: "*"`) -> 200 + sdpfrag + new
    ETag, and the old ICE session keeps carrying media."""
    publisher = HttpPublisher(http, "c-patch")
    viewer = HttpViewer(http, "c-patch")
    try:
        await publisher.start()
        response = await viewer.start()
        etag = response.headers["ETag"]
        offer = sdp.SessionDescription.parse(viewer.pc.localDescription.sdp)
        ufrag, pwd = offer.media[0].ice_ufrag, offer.media[0].ice_pwd
        body = (
            f"a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\n"
            "a=mid:0\r\na=candidate:1 1 udp 2122260223 127.0.0.1 61764 typ host\r\n"
            "a=candidate:2 0 udp 1 127.0.0.1 9 typ host\r\na=end-of-candidates\r\n"
        )
        async with http.patch(viewer.location, data=body, headers={**FRAG, "If-Match": etag}) as r:
            assert r.status == 204 and "ETag" not in r.headers
        async with http.patch(viewer.location, data=body, headers={**FRAG, "ETag": etag}) as r:
            assert r.status == 204
        async with http.patch(
            viewer.location, data=body, headers={**FRAG, "If-Match": '"stale"'}
        ) as r:
            assert r.status == 412
        async with http.patch(viewer.location, data="{}", headers=FRAG) as r:
            assert r.status == 204  # a JSON body under the sdpfrag type is ignored (issue 3)
        restart = body.replace(ufrag or "", "rst1").replace(pwd or "", "restartpassword000000000")
        async with http.patch(
            viewer.location, data=restart, headers={**FRAG, "If-Match": '"*"'}
        ) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("application/trickle-ice-sdpfrag")
            assert r.headers["ETag"] != etag
            fragment = sdp.parse_sdpfrag(await r.text())
            assert fragment.ufrag and fragment.pwd and fragment.usable_candidates
        # The client never used the new credentials: the old ICE session stays (§4.4.3).
        before = len(viewer.video_frames)
        await viewer.wait_frames(before + 10)
    finally:
        await viewer.stop()
        await publisher.stop()


async def test_get_head_options_on_endpoints_and_sessions(http: aiohttp.ClientSession) -> None:
    """WHEP §4.1: GET -> 2xx, no body; HEAD on the endpoint -> 200 application/sdp;
    OPTIONS: Accept-Post on endpoints, Accept-Patch on sessions."""
    publisher = HttpPublisher(http, "c-verbs")
    try:
        await publisher.start()
        async with http.get("/whep/c-verbs") as response:
            assert response.status // 100 == 2 and await response.read() == b""
        async with http.head("/whep/c-verbs") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("application/sdp")
        async with http.options("/whep/c-verbs") as response:
            assert response.headers["Accept-Post"] == "application/sdp"
        async with http.options(publisher.location) as response:
            assert "application/trickle-ice-sdpfrag" in response.headers["Accept-Patch"]
    finally:
        await publisher.stop()
