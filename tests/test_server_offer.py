"""The legacy server-offer mode of WHEP (draft-murillo-whep-00/01 §4; removed in -02).

A POST with no body asks the server for an offer: 201 + offer + Location + Expires, then
the player PATCHes its answer (application/sdp) to the Location and gets 204. Eyevinn's
webrtc-player sends exactly that (Content-Type application/sdp, empty body) after a
400 to its own offer; M00/M01's example sends no Content-Type at all. Driven here by an
aiortc viewer as the answerer, against a live server with an aiortc publisher.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator

import aiohttp
import pytest
from _peers import DecodingViewer, only_loopback_candidates
from _server import LiveServer, live_server
from _signalling import AUTH, SDP, negotiate, placeholder_publisher, wait_connected
from aiortc import RTCSessionDescription

from whepfan.protocol.sdp import SessionDescription


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = live_server()
    yield live
    live.close()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_loopback_candidates(monkeypatch)


@pytest.mark.parametrize(
    ("stream", "request_headers"),
    [
        pytest.param("eyevinn", SDP, id="eyevinn-webrtc-player"),  # Content-Type, no body
        pytest.param("m01", {"Accept": "application/sdp"}, id="draft-murillo-whep-01"),
    ],
)
async def test_an_empty_whep_post_gets_a_server_offer_and_the_patched_answer_plays(
    server: LiveServer, stream: str, request_headers: dict[str, str]
) -> None:
    async with aiohttp.ClientSession(base_url=server.url) as http:
        publisher = placeholder_publisher()
        viewer = DecodingViewer()
        try:
            await negotiate(http, publisher, f"/whip/{stream}", AUTH)
            await wait_connected(publisher)
            async with http.post(f"/whep/{stream}", headers=request_headers) as response:
                assert response.status == 201, await response.text()
                offer = await response.text()
                location = response.headers["Location"]
                assert response.headers["Content-Type"] == "application/sdp"
                assert response.headers["ETag"]
                expires = email.utils.parsedate_to_datetime(response.headers["Expires"])
            assert expires.timestamp() > time.time()
            assert location.startswith(f"/whep/{stream}/")
            # The server's offer sends (M01 §4: the offer sendonly, the answer recvonly).
            parsed = SessionDescription.parse(offer)
            assert {media.direction for media in parsed.media} == {"sendonly"}

            await viewer.pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            await viewer.pc.setLocalDescription(await viewer.pc.createAnswer())
            answer = viewer.pc.localDescription.sdp
            async with http.patch(location, data=answer, headers=SDP) as patched:
                assert patched.status == 204, await patched.text()
            await viewer.wait_frames(3, timeout=20)
            async with http.delete(location) as deleted:
                assert deleted.status == 200
        finally:
            await viewer.close()
            await publisher.close()
