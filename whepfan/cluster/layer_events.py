"""The origin's layers, as a WHEP session hears them: the I/O around simulcast.py.

EXT §5 makes a server with the layer extension support the SSE extension with the
``layers`` event (EXT §4.3.3), so that is the standard way to learn a stream's layers,
and the one used first: POST ``["layers"]`` to the SSE Link (EXT §4.2), GET the event
stream it creates (or, where the POST is not understood, GET the Link itself, as
Broadcast Box serves it), and read ``layers`` events for as long as the session lives:
the origin sends one at once when it knows the layers, and again whenever they change.

A server that links the layer resource but no event stream is asked by GET on the layer
URL, every ``LAYER_POLL_INTERVAL`` (whepfan and live777 answer it; EXT §5 defines no
GET, so a server that does not is read as having a single layer).
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator, Mapping

import aiohttp
import orjson

from whepfan.cluster.simulcast import EVENTS_REL, LAYER_REL, SseParser, layer_rids

LAYER_POLL_INTERVAL = 2.0
# An event stream quiet this long is dead (whepfan sends a keep-alive comment every 15 s).
EVENT_STREAM_READ_TIMEOUT = 60.0
_REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=10)


def _headers(token: str | None, content_type: str | None = None) -> dict[str, str]:
    headers = {"Content-Type": content_type} if content_type else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


async def layer_updates(
    http: aiohttp.ClientSession, links: Mapping[str, str], token: str | None
) -> AsyncIterator[tuple[str, ...]]:
    """Each layer list the origin announces, low to high (empty: a single layer), until
    the event stream ends; nothing at all without the layer extension. Raises
    ``aiohttp.ClientError`` / ``OSError`` / ``TimeoutError`` / ``ValueError`` when the
    events cannot be read."""
    events_url, layer_url = links.get(EVENTS_REL), links.get(LAYER_REL)
    if layer_url is None:
        return
    if events_url is None:
        last: tuple[str, ...] | None = None
        while True:
            rids = await _polled_layers(http, layer_url, token)
            if rids != last:
                last = rids
                yield rids
            await asyncio.sleep(LAYER_POLL_INTERVAL)
    stream_url = await _subscribe(http, events_url, token)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=EVENT_STREAM_READ_TIMEOUT)
    async with http.get(
        stream_url, headers={**_headers(token), "Accept": "text/event-stream"}, timeout=timeout
    ) as response:
        if response.status != 200:
            raise ValueError(f"the event stream answered {response.status}")
        parser = SseParser()
        async for chunk in response.content.iter_any():
            for event in parser.feed(chunk):
                if event.type == "layers":
                    yield layer_rids(orjson.loads(event.data))


async def _subscribe(http: aiohttp.ClientSession, events_url: str, token: str | None) -> str:
    """EXT §4.2: POST the event names, get the event stream's Location (relative to the
    Link URL); a server that does not take the POST is read at the Link URL itself."""
    async with http.post(
        events_url,
        data=orjson.dumps(["layers"]),
        headers=_headers(token, "application/json"),
        timeout=_REQUEST_TIMEOUT,
    ) as response:
        location = response.headers.get("Location")
        if response.status == 201 and location:
            return urllib.parse.urljoin(events_url, location)
    return events_url


async def _polled_layers(
    http: aiohttp.ClientSession, layer_url: str, token: str | None
) -> tuple[str, ...]:
    async with http.get(layer_url, headers=_headers(token), timeout=_REQUEST_TIMEOUT) as response:
        if response.status != 200:
            return ()
        document = orjson.loads(await response.read())
    # whepfan: {"layers": [{"rid": ...}]}; live777: [{"encodingId": ...}]
    listed = document.get("layers") if isinstance(document, dict) else document
    return layer_rids({"0": listed})
