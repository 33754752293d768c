"""The HTTP contract over the real session layer: ``whepfan.server.run`` (media worker +
aiohttp on 127.0.0.1), real Chromium offers from the fixtures and offers made by aiortc.

Media through the server (frames decoding) is tested by the lead's end-to-end suite;
this module checks that real offers negotiate into answers real peers accept.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator

import aiohttp
import pytest
from _paths import SDP_FIXTURES
from _server import TOKEN, LiveServer, settings_for
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack
from hypothesis import given, settings
from hypothesis import strategies as st

from whepfan.protocol import sdp

FIXTURES = SDP_FIXTURES
WHEP_OFFER = (FIXTURES / "chromium-156-whep-recvonly-offer.sdp").read_text()
WHIP_OFFER = (FIXTURES / "chromium-156-whip-sendonly-offer.sdp").read_text()
SIMULCAST_OFFER = (FIXTURES / "chromium-156-whip-simulcast-offer.sdp").read_text()
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SDP = {"Content-Type": "application/sdp"}
FRAG = {"Content-Type": "application/trickle-ice-sdpfrag"}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = LiveServer(settings_for(max_viewers="3"))
    yield live
    live.close()


@pytest.fixture
async def http(server: LiveServer) -> aiohttp.ClientSession:
    async with aiohttp.ClientSession(base_url=server.url) as session:
        yield session  # type: ignore[misc]


def _stream(request: pytest.FixtureRequest) -> str:
    # A stream per test: the module shares one server.
    return request.node.name.replace("[", "-").replace("]", "")[:100]


async def _aiortc_publisher_offer() -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(AudioStreamTrack())
    pc.addTrack(VideoStreamTrack())
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def _aiortc_viewer_offer() -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction="recvonly")
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def _publish(http: aiohttp.ClientSession, stream: str, offer: str = WHIP_OFFER) -> str:
    async with http.post(f"/whip/{stream}", data=offer, headers={**AUTH, **SDP}) as response:
        assert response.status == 201, await response.text()
        return response.headers["Location"]


@pytest.mark.parametrize("offer", [WHIP_OFFER, SIMULCAST_OFFER], ids=["sendonly", "simulcast"])
async def test_chromium_whip_offers_negotiate(
    http: aiohttp.ClientSession, request: pytest.FixtureRequest, offer: str
) -> None:
    stream = _stream(request)
    async with http.post(f"/whip/{stream}", data=offer, headers={**AUTH, **SDP}) as response:
        assert response.status == 201
        assert response.headers["Content-Type"] == "application/sdp"
        location = response.headers["Location"]
        answer = sdp.SessionDescription.parse(await response.text())
    # Location: absolute path, session id with >= 128 bits (22+ base64url characters).
    assert location.startswith(f"/whip/{urllib.parse.quote(stream)}/")
    assert len(location.rsplit("/", 1)[1]) >= 22
    bundled = [m for m in answer.media if m.port != 0]
    assert bundled and all(m.direction == "recvonly" for m in bundled)
    assert all(m.rtcp_mux_only for m in bundled)
    assert response.headers["ETag"].startswith('"')
    async with http.delete(location, headers=AUTH) as response:
        assert response.status == 200


async def test_chromium_whep_offer_negotiates(
    http: aiohttp.ClientSession, request: pytest.FixtureRequest
) -> None:
    stream = _stream(request)
    publisher = await _publish(http, stream)
    async with http.post(f"/whep/{stream}", data=WHEP_OFFER, headers=SDP) as response:
        assert response.status == 201, await response.text()
        viewer = response.headers["Location"]
        answer = sdp.SessionDescription.parse(await response.text())
    assert viewer.startswith(f"/whep/{stream}/")
    sections = [m for m in answer.media if m.port != 0]
    assert sections and all(m.direction == "sendonly" for m in sections)
    first = answer.media[0]
    # Every server candidate, then a=end-of-candidates (WHEP draft-03 §4.4.2).
    assert first.candidates and first.end_of_candidates
    assert any(c.address == "127.0.0.1" and c.type == "host" for c in first.candidates)
    for location in (viewer, publisher):
        async with http.delete(location, headers=AUTH) as response:
            assert response.status == 200


async def test_aiortc_publisher_and_viewer_accept_the_answers(
    http: aiohttp.ClientSession, request: pytest.FixtureRequest
) -> None:
    stream = _stream(request)
    publisher_pc, offer = await _aiortc_publisher_offer()
    viewer_pc, viewer_offer = await _aiortc_viewer_offer()
    locations: list[str] = []
    try:
        async with http.post(f"/whip/{stream}", data=offer, headers={**AUTH, **SDP}) as response:
            assert response.status == 201, await response.text()
            answer = await response.text()
            locations.append(response.headers["Location"])
        await publisher_pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        async with http.post(f"/whep/{stream}", data=viewer_offer, headers=SDP) as response:
            assert response.status == 201, await response.text()
            viewer_answer = await response.text()
            locations.append(response.headers["Location"])
        await viewer_pc.setRemoteDescription(RTCSessionDescription(viewer_answer, "answer"))
        kinds = sorted(t.track.kind for t in viewer_pc.getReceivers() if t.track is not None)
        assert kinds == ["audio", "video"]
    finally:
        await publisher_pc.close()
        await viewer_pc.close()
        for location in locations:
            async with http.delete(location, headers=AUTH) as response:
                assert response.status == 200


async def test_status_codes_over_the_real_router(
    http: aiohttp.ClientSession, request: pytest.FixtureRequest
) -> None:
    stream = _stream(request)
    # 409 + Retry-After: nothing is published yet.
    async with http.post(f"/whep/{stream}", data=WHEP_OFFER, headers=SDP) as response:
        assert response.status == 409 and int(response.headers["Retry-After"]) > 0
        assert response.headers["Content-Type"] == "application/problem+json"
    publisher = await _publish(http, stream)
    # A second publisher: 409.
    async with http.post(f"/whip/{stream}", data=WHIP_OFFER, headers={**AUTH, **SDP}) as response:
        assert response.status == 409
    # Auth: 401 + WWW-Authenticate.
    async with http.post(f"/whip/{stream}x", data=WHIP_OFFER, headers=SDP) as response:
        assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    # A WHEP offer to the WHIP endpoint: nothing to receive -> 4xx, never 5xx.
    async with http.post(f"/whip/{stream}y", data=WHEP_OFFER, headers={**AUTH, **SDP}) as response:
        assert 400 <= response.status < 500
    # Capacity (max_viewers=3): the fourth viewer gets 503 + Retry-After.
    viewers = []
    for _ in range(3):
        async with http.post(f"/whep/{stream}", data=WHEP_OFFER, headers=SDP) as response:
            assert response.status == 201
            viewers.append(response.headers["Location"])
    async with http.post(f"/whep/{stream}", data=WHEP_OFFER, headers=SDP) as response:
        assert response.status == 503 and int(response.headers["Retry-After"]) > 0
    # The publisher leaves; its viewers stay (they resume when a publisher returns).
    async with http.delete(publisher, headers=AUTH) as response:
        assert response.status == 200
    async with http.delete(publisher, headers=AUTH) as response:
        assert response.status == 404
    async with http.get(viewers[0]) as response:
        assert response.status == 204
    returning = await _publish(http, stream)
    for location in [*viewers, returning]:
        async with http.delete(location, headers=AUTH) as response:
            assert response.status == 200


async def test_trickle_and_ice_restart_over_the_real_router(
    http: aiohttp.ClientSession, request: pytest.FixtureRequest
) -> None:
    stream = _stream(request)
    publisher = await _publish(http, stream)
    trickle = (
        "a=group:BUNDLE 0 1\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n"
        "a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\n"
        "a=candidate:1 1 udp 2122260223 192.0.2.1 61764 typ host\r\na=end-of-candidates\r\n"
    )
    offer_ufrag = "/5MN"  # the WHIP fixture's ice-ufrag
    assert f"a=ice-ufrag:{offer_ufrag}" in WHIP_OFFER
    body = trickle.format(ufrag=offer_ufrag, pwd="unused-for-trickle-000000")
    async with http.patch(publisher, data=body, headers={**AUTH, **FRAG}) as response:
        assert response.status == 204 and "ETag" not in response.headers
    restart = trickle.format(ufrag="new1", pwd="newpassword0000000000000")
    headers = {**AUTH, **FRAG, "If-Match": "*"}
    async with http.patch(publisher, data=restart, headers=headers) as response:
        assert response.status == 200
        fragment = sdp.parse_sdpfrag(await response.text())
        assert fragment.ufrag and fragment.pwd and fragment.usable_candidates
        assert response.headers["ETag"].startswith('"')


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[LiveServer]:
    live = LiveServer(settings_for(max_viewers="100000"))
    yield live
    live.close()


_lines = st.sampled_from(
    WHEP_OFFER.splitlines() + WHIP_OFFER.splitlines()[:40] + ["a=", "m=video 0 X 1", "x=y"]
)


@settings(max_examples=60)
@given(
    lines=st.lists(_lines, max_size=60),
    endpoint=st.sampled_from(["whip", "whep"]),
    drop=st.integers(min_value=0, max_value=200),
)
def test_fuzzed_offers_never_get_5xx_from_the_real_router(
    fuzz_server: LiveServer, lines: list[str], endpoint: str, drop: int
) -> None:
    """Shuffled real offer lines, and real offers with one line dropped."""
    import urllib.error
    import urllib.request

    base = (WHEP_OFFER if endpoint == "whep" else WHIP_OFFER).splitlines()
    bodies = ["\r\n".join(lines), "\r\n".join(base[:drop] + base[drop + 1 :])]
    if endpoint == "whep":
        # Make sure a publisher is live so WHEP offers reach negotiation.
        publish = urllib.request.Request(
            f"{fuzz_server.url}/whip/fuzz", data=WHIP_OFFER.encode(), method="POST",
            headers={**AUTH, **SDP},
        )  # fmt: skip
        try:
            urllib.request.urlopen(publish, timeout=10).close()
        except urllib.error.HTTPError as exc:
            assert exc.code == 409
    for body in bodies:
        request = urllib.request.Request(
            f"{fuzz_server.url}/{endpoint}/fuzz{'' if endpoint == 'whep' else 'in'}",
            data=body.encode(), method="POST", headers={**AUTH, **SDP},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status = response.status
                location = response.headers["Location"]
            delete = urllib.request.Request(
                fuzz_server.url + location, method="DELETE", headers=AUTH
            )
            urllib.request.urlopen(delete, timeout=10).close()
        except urllib.error.HTTPError as exc:
            status = exc.code
        assert status < 500, (status, body)
