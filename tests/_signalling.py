"""WHIP and WHEP over HTTP for the tests that run a real server (tests/_server.py): the
headers, aiortc peers that only need to negotiate (aiortc's own placeholder tracks, no
decoding), the offer/answer exchange, a WHEP viewer that keeps its layer URL, and
whepfan.client's simulcast publisher.

The media side of the peers (moving pattern, decoding viewer) lives in tests/_peers.py.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence

import aiohttp
from _peers import accept_answer, new_peer
from _server import TOKEN
from aiortc import RTCPeerConnection
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack

from whepfan.client.publisher import Publisher, PublisherOptions
from whepfan.http.layers import LAYER_REL

SDP = {"Content-Type": "application/sdp"}
JSON = {"Content-Type": "application/json"}


def bearer(token: str) -> dict[str, str]:
    """The Authorization header of a WHIP client (RFC 9725 §4.1, RFC 6750 §2.1)."""
    return {"Authorization": f"Bearer {token}"}


AUTH = bearer(TOKEN)


def placeholder_publisher() -> RTCPeerConnection:
    """An aiortc publisher with aiortc's own placeholder audio and video tracks (silence and
    a green frame): enough to negotiate, connect and carry packets."""
    pc = new_peer()
    pc.addTrack(AudioStreamTrack())
    pc.addTrack(VideoStreamTrack())
    return pc


def recvonly_peer(kinds: Sequence[str] = ("audio", "video")) -> RTCPeerConnection:
    """An aiortc viewer with one recvonly transceiver per entry of ``kinds``, in that order;
    nothing reads what it receives."""
    pc = new_peer()
    for kind in kinds:
        pc.addTransceiver(kind, direction="recvonly")
    return pc


async def local_offer(pc: RTCPeerConnection) -> str:
    """``pc``'s offer, set as its local description (aiortc gathers candidates first)."""
    await pc.setLocalDescription(await pc.createOffer())
    return str(pc.localDescription.sdp)


async def publisher_offer() -> tuple[RTCPeerConnection, str]:
    pc = placeholder_publisher()
    return pc, await local_offer(pc)


async def viewer_offer() -> tuple[RTCPeerConnection, str]:
    pc = recvonly_peer()
    return pc, await local_offer(pc)


async def exchange(
    http: aiohttp.ClientSession, url: str, offer: str, headers: dict[str, str] | None = None
) -> tuple[aiohttp.ClientResponse, str]:
    """POST ``offer`` to a WHIP or WHEP endpoint, which must create the session (201,
    RFC 9725 §4.2 / WHEP §4.2); the response (for its headers) and the answer."""
    async with http.post(url, data=offer, headers={**(headers or {}), **SDP}) as response:
        assert response.status == 201, await response.text()
        answer = await response.text()
    return response, answer


async def negotiate(
    http: aiohttp.ClientSession,
    pc: RTCPeerConnection,
    url: str,
    headers: dict[str, str] | None = None,
) -> aiohttp.ClientResponse:
    """``pc``'s offer through :func:`exchange`, and the answer applied; the response."""
    response, answer = await exchange(http, url, await local_offer(pc), headers)
    await accept_answer(pc, answer)
    return response


async def publish(http: aiohttp.ClientSession, stream: str) -> RTCPeerConnection:
    """A placeholder publisher on ``/whip/<stream>`` with the server's TOKEN; not awaited
    to connect."""
    pc = placeholder_publisher()
    await negotiate(http, pc, f"/whip/{stream}", AUTH)
    return pc


async def view(http: aiohttp.ClientSession, stream: str) -> aiohttp.ClientResponse:
    """A WHEP POST to ``/whep/<stream>`` whatever its status (for the refusal tests); the
    peer is closed at once, so an admitted session stays until DELETE or ICE timeout."""
    pc, offer = await viewer_offer()
    try:
        async with http.post(f"/whep/{stream}", data=offer, headers=SDP) as response:
            await response.read()
            return response
    finally:
        await pc.close()


async def wait_connected(pc: RTCPeerConnection) -> None:
    """Until ``pc`` reports ICE and DTLS connected; fails the test after 10 s."""
    for _ in range(200):
        if pc.connectionState == "connected":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"peer stuck in {pc.connectionState}")


async def wait_for(condition: Callable[[], Awaitable[object]], timeout: float = 15.0) -> None:
    """Poll the async ``condition`` (e.g. an HTTP GET) until it holds; fails the test if it
    still does not after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert await condition()


def layer_url_of(response: aiohttp.ClientResponse) -> str:
    """The layer resource a WHEP 201 links (EXT §5): exactly one Link with its rel, and
    the URL is the session's Location + "/layer"."""
    links = [link for link in response.headers.getall("Link", []) if f'rel="{LAYER_REL}"' in link]
    assert len(links) == 1, "the 201 links the layer resource (EXT §5)"
    match = re.match(r"<([^>]+)>", links[0])
    assert match is not None
    layer_url = match.group(1)
    assert layer_url == response.headers["Location"] + "/layer"
    return layer_url


class HttpViewer:
    """An aiortc WHEP viewer over HTTP; it keeps the layer URL from the 201's Link."""

    def __init__(self) -> None:
        self.pc = recvonly_peer()
        self.location = ""
        self.layer_url = ""
        self.session_id = ""

    async def start(self, http: aiohttp.ClientSession, url: str) -> None:
        response = await negotiate(http, self.pc, url)
        self.location = response.headers["Location"]
        self.layer_url = layer_url_of(response)
        self.session_id = self.location.rsplit("/", 1)[-1]

    async def close(self, http: aiohttp.ClientSession) -> None:
        # WHEP §4.3: the player ends its session with a DELETE on the session URL.
        async with http.delete(self.location) as response:
            assert response.status == 200
        await self.pc.close()


def simulcast_publisher(url: str) -> Publisher:
    """whepfan.client's simulcast publisher for the WHIP endpoint ``url`` with the server's
    TOKEN: three encodings of a 320x240 pattern, a keyframe every second (so layer switches
    never wait on a throttled keyframe request). Use as ``async with``."""
    return Publisher(
        PublisherOptions(
            url=url,
            token=TOKEN,
            simulcast=True,
            width=320,
            height=240,
            keyframe_interval=1.0,
        )
    )
