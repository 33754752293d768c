"""Graceful drain (SIGTERM): new sessions get 503 + Retry-After, event readers are told to
reconnect, the server waits for viewers to leave (or for the drain timeout) and exits.

The server runs as ``whepfan serve`` does (``server.run``) on its own loop thread; the
test sets the drain event where SIGTERM would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest
from _server import LiveServer, live_server
from _signalling import publish, view


@pytest.fixture
def server() -> Iterator[LiveServer]:
    live = live_server(drain_timeout="30")
    yield live
    live.close()


async def _event_frames(http: aiohttp.ClientSession, events_url: str, sink: list[str]) -> None:
    async with http.get(events_url) as response:
        assert response.status == 200
        async for line in response.content:
            sink.append(line.decode())


async def test_drain_refuses_new_sessions_tells_readers_and_exits_when_viewers_leave(
    server: LiveServer,
) -> None:
    async with aiohttp.ClientSession(base_url=server.url) as http:
        publisher = await publish(http, "cam")
        first = await view(http, "cam")
        assert first.status == 201
        location = first.headers["Location"]
        events = [link for link in first.headers.getall("Link", []) if "server-sent-events" in link]
        frames: list[str] = []
        reader: asyncio.Task[None] | None = None
        assert events, "the SSE extension is advertised"
        if events:
            events_url = events[0].split(">")[0].lstrip("<")
            reader = asyncio.ensure_future(_event_frames(http, events_url, frames))
            await asyncio.sleep(0.2)  # the reader subscribes before the drain starts

        server.begin_drain()
        for _ in range(100):
            refused = await view(http, "cam")
            if refused.status == 503:
                break
            await asyncio.sleep(0.02)
        assert refused.status == 503
        assert int(refused.headers["Retry-After"]) > 0
        async with http.get("/metrics") as response:
            body = await response.text()
        assert "whepfan_draining 1.0" in body
        assert 'whepfan_admission_refusals_total{reason="draining"} 1.0' in body, body
        if reader is not None:
            for _ in range(100):
                if any("reconnect" in frame for frame in frames):
                    break
                await asyncio.sleep(0.02)
            assert any(frame.startswith("event: reconnect") for frame in frames), frames
            reader.cancel()
        # The server waits for its viewer; once it leaves, the server exits.
        assert server.thread.is_alive()
        async with http.delete(location) as response:
            assert response.status == 200
        await publisher.close()
    server.thread.join(10)
    assert not server.thread.is_alive()


async def test_drain_gives_up_after_its_timeout() -> None:
    live = live_server(drain_timeout="0.5")
    try:
        async with aiohttp.ClientSession(base_url=live.url) as http:
            publisher = await publish(http, "cam")
            assert (await view(http, "cam")).status == 201
            live.begin_drain()
            # The viewer never leaves: the drain timeout ends the server anyway.
            await asyncio.get_running_loop().run_in_executor(None, live.thread.join, 20)
            assert not live.thread.is_alive()
            await publisher.close()
    finally:
        live.close()
