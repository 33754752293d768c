"""Hostile or broken HTTP input gets a 4xx problem (or a closed connection), never a 5xx,
an ERROR line or a traceback: against a real ``whepfan.server.run`` (tests/_server.py).

Covers issue 16's HTTP half: a one-SSRC FID group, compressed bodies, a client that goes
away mid-body, malformed request heads, stream names, CORS preflights on every resource a
page calls, static file headers, and an aiortc viewer that offers audio and video to a
video-only stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import re
import zlib
from collections.abc import AsyncIterator, Iterator

import aiohttp
import orjson
import pytest
from _peers import DecodingViewer, accept_answer, only_loopback_candidates, sending_peer
from _server import TOKEN, LiveServer, settings_for
from _signalling import AUTH, SDP, exchange, local_offer, placeholder_publisher

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = LiveServer(settings_for(token=TOKEN, worker_packet_budget="none"))
    yield live
    live.close()


@pytest.fixture
async def http(server: LiveServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=server.url) as session:
        yield session


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_loopback_candidates(monkeypatch)


async def problem(response: aiohttp.ClientResponse, status: int) -> str:
    """The problem detail of a problem+json response with ``status``."""
    body = await response.read()
    assert response.status == status, body
    assert response.headers["Content-Type"] == PROBLEM
    document = orjson.loads(body)
    assert document["status"] == status
    detail = document["detail"]
    assert isinstance(detail, str) and detail
    return detail


async def metric(http: aiohttp.ClientSession, name: str) -> float:
    async with http.get("/metrics") as response:
        text = await response.text()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def no_error_records(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


# ---------------------------------------------------------------------------- offers


async def test_whip_offer_with_a_one_ssrc_fid_group_is_a_400_naming_it(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    pc = placeholder_publisher()
    try:
        offer = await local_offer(pc)
    finally:
        await pc.close()
    broken = re.sub(r"a=ssrc-group:FID (\d+) \d+", r"a=ssrc-group:FID \1", offer, count=1)
    assert broken != offer
    with caplog.at_level(logging.DEBUG):
        async with http.post("/whip/fid", data=broken, headers={**AUTH, **SDP}) as response:
            detail = await problem(response, 400)
    assert "ssrc-group:FID" in detail and "RFC 4588" in detail
    no_error_records(caplog)


@pytest.mark.parametrize("coding", ["deflate", "gzip", "br", "identity, gzip"])
async def test_compressed_post_bodies_are_415_and_never_inflated(
    http: aiohttp.ClientSession, coding: str
) -> None:
    """body.py: 415 + Accept-Encoding: identity (RFC 9110 §15.5.16); the body is a
    deflate bomb's beginning, which must not be decoded (the server runs without
    aiohttp's auto_decompress)."""
    bomb = zlib.compress(b"\0" * 1_000_000) if coding == "deflate" else gzip.compress(b"v=0")
    headers = {**SDP, "Content-Encoding": coding}
    async with http.post("/whep/anything", data=bomb, headers=headers) as response:
        detail = await problem(response, 415)
        assert response.headers["Accept-Encoding"] == "identity"
    assert "Content-Encoding" in detail


async def test_client_that_disconnects_mid_body_is_not_an_error(
    server: LiveServer, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    aborted = await metric(http, "whepfan_http_aborted_requests_total")
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with caplog.at_level(logging.DEBUG):
        _reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /whep/cut HTTP/1.1\r\nHost: x\r\nContent-Type: application/sdp\r\n"
            b"Content-Length: 4000\r\n\r\nv=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n"
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        for _ in range(100):  # the server notices the close on its own loop: poll
            if await metric(http, "whepfan_http_aborted_requests_total") > aborted:
                break
            await asyncio.sleep(0.05)
    assert await metric(http, "whepfan_http_aborted_requests_total") == aborted + 1
    no_error_records(caplog)


async def test_malformed_request_is_a_400_and_one_debug_line(
    server: LiveServer, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    malformed = await metric(http, "whepfan_http_malformed_requests_total")
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /api/streams HTTP/1.1\r\nHost: x\r\nBad\x01Header: y\r\n\r\n")
        status_line = await reader.readline()
        writer.close()
        await writer.wait_closed()
    assert status_line.split()[1] == b"400", status_line
    lines = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG and not lines[0].exc_info
    assert "malformed HTTP request" in lines[0].getMessage()
    assert "\n" not in lines[0].getMessage()
    no_error_records(caplog)
    assert await metric(http, "whepfan_http_malformed_requests_total") == malformed + 1


# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name",
    [".hidden", "~home", "a%20b", "a%2Fb", "x" * 65, "caf%C3%A9", "a:b", "%2E%2E"],
)
async def test_bad_stream_names_are_400_problems(http: aiohttp.ClientSession, name: str) -> None:
    for path in (f"/whep/{name}", f"/whip/{name}", f"/api/streams/{name}", f"/watch/{name}"):
        async with http.get(aiohttp.client.URL(path, encoded=True)) as response:
            if response.status == 404:
                # yarl/aiohttp normalise some forms (%2F, %2E%2E) into other paths
                # before routing: then no stream route matched at all.
                continue
            detail = await problem(response, 400)
            assert "is not a stream name" in detail


@pytest.mark.parametrize("target", ["/whip/..", "/whip/.", "/whep/..", "/whep/.", "/whip/.%2E"])
async def test_dot_segment_stream_names_sent_verbatim_are_400_and_make_no_session(
    server: LiveServer, http: aiohttp.ClientSession, target: str
) -> None:
    """The issue's probe: ``POST /whip/..`` was answered 201 with ``Location:
    /whip/../<id>``. Sent as the request-target verbatim (an HTTP client would remove
    the dot segments first, RFC 3986 §5.2.4), with a valid offer and token, it is a
    400 naming the name, and no session is made."""
    pc = placeholder_publisher()
    try:
        offer = (await local_offer(pc)).encode()
    finally:
        await pc.close()
    async with http.get("/api/streams", headers=AUTH) as listing:
        streams_before = (await listing.json())["streams"]
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/sdp\r\nContent-Length: {len(offer)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + offer
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)  # until the server closes
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split()[1] == b"400", head
    assert b"\r\nLocation:" not in head
    assert b"is not a stream name" in body
    async with http.get("/api/streams", headers=AUTH) as listing:
        assert (await listing.json())["streams"] == streams_before


@pytest.mark.parametrize("name", ["a", "live-1", "cam_2.main", "x" * 64, "-dash", "a~b"])
async def test_good_stream_names_reach_their_resource(
    http: aiohttp.ClientSession, name: str
) -> None:
    async with http.get(f"/whep/{name}") as response:
        assert response.status == 204  # WHEP §4.1: the endpoint exists, no representation
    async with http.get(f"/api/streams/{name}") as response:
        await problem(response, 404)  # no such stream: the name itself was fine


# ---------------------------------------------------------------------------- CORS, static


async def test_every_resource_a_page_calls_answers_a_preflight(
    http: aiohttp.ClientSession,
) -> None:
    preflight = {
        "Origin": "https://player.example",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    pc = placeholder_publisher()
    try:
        response, _ = await exchange(http, "/whip/cors", await local_offer(pc), AUTH)
        publisher_session = response.headers["Location"]
        pc_view = placeholder_publisher()
        offer = await local_offer(pc_view)
        await pc_view.close()
        paths = [
            "/api/streams",
            "/api/streams/cors",
            "/metrics",
            "/whep/cors",
            "/whip/cors",
            publisher_session,
            "/",
            "/watch/cors",
            "/static/whep.js",
        ]
        async with http.post("/whep/cors", data=offer, headers=SDP) as viewer:
            assert viewer.status == 201, await viewer.text()
            paths.append(viewer.headers["Location"])
            # The extension resources a player calls next: events and layer (WHEP EXT).
            links = [link.split(">")[0].lstrip("<") for link in viewer.headers.getall("Link")]
            assert any("/events" in link for link in links), links
            assert any("/layer" in link for link in links), links
            paths.extend(links)
            # And the event stream a subscription makes (EXT §4.2), which a page DELETEs.
            events = next(link for link in links if "/events" in link)
            async with http.post(
                events, data=b'["active"]', headers={"Content-Type": "application/json"}
            ) as subscribed:
                assert subscribed.status == 201, await subscribed.text()
                event_stream = subscribed.headers["Location"]
                paths.append(event_stream)
        for path in paths:
            async with http.options(path, headers=preflight) as answer:
                assert 200 <= answer.status < 300, (path, answer.status)
                assert answer.headers["Access-Control-Allow-Origin"] == "*"
                allowed = answer.headers["Access-Control-Allow-Methods"]
                assert "OPTIONS" in allowed, (path, allowed)
                assert "Authorization" in answer.headers["Access-Control-Allow-Headers"]
                if path == event_stream:
                    assert "DELETE" in allowed, allowed
    finally:
        await pc.close()


async def test_static_files_are_nosniff_and_revalidated(http: aiohttp.ClientSession) -> None:
    async with http.get("/static/whep.js") as response:
        assert response.status == 200
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-cache"
        last_modified = response.headers["Last-Modified"]
    async with http.get(
        "/static/whep.js", headers={"If-Modified-Since": last_modified}
    ) as response:
        assert response.status == 304  # no-cache costs a revalidation, not a download


# ---------------------------------------------------------------------------- answers


async def test_audio_and_video_viewer_plays_a_video_only_stream(server: LiveServer) -> None:
    """The answer rejects the viewer's m=audio (port 0) with the ICE/DTLS attributes
    aiortc insists on, and the video decodes."""
    publisher = await sending_peer(audio=False)
    viewer = DecodingViewer()
    try:
        async with aiohttp.ClientSession(base_url=server.url) as http:
            _, answer = await exchange(
                http, "/whip/video-only", publisher.localDescription.sdp, AUTH
            )
            await accept_answer(publisher, answer)
            offer = await viewer.offer(["audio", "video"])
            _, answer = await exchange(http, "/whep/video-only", offer)
        assert re.search(r"^m=audio 0 ", answer, re.MULTILINE)
        await viewer.accept(answer)
        await viewer.wait_frames(5, timeout=20)
        assert viewer.audio_frames == 0
    finally:
        await viewer.close()
        await publisher.close()
