"""The WHEP layer selection extension over HTTP (EXT §5, spec notes §4.3) against the real
router with an in-memory simulcast publisher (see test_simulcast.py)."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import AsyncIterator

import orjson
import pytest
from _signalling import JSON, SDP, layer_url_of
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st
from test_simulcast import (
    PUBLISHER,
    SIMULCAST_OFFER,
    WHEP_OFFER,
    RouterHarness,
    SimulcastPublisher,
    connect,
)

from whepfan.errors import ParseError
from whepfan.http import HttpOptions, create_app
from whepfan.http.events import EVENTS_REL
from whepfan.http.layers import LAYER_REL, parse_layer_request
from whepfan.media.layers import LayerRequest


@pytest.fixture
async def client() -> AsyncIterator[tuple[TestClient, RouterHarness]]:
    h = RouterHarness()
    publisher = SimulcastPublisher(h, connect(h, SIMULCAST_OFFER, PUBLISHER, publish=True))
    for index in range(3):  # every layer bound by its RID and measured
        publisher.send_frame(index / 30)
    app = create_app(router=h.router, clock=lambda: 1.0, options=HttpOptions())
    async with TestClient(TestServer(app)) as test_client:
        yield test_client, h
    h.close()


async def new_viewer(client: TestClient, query: str = "") -> str:
    """WHEP POST; the layer URL from the 201's Link (EXT §5)."""
    response = await client.post(f"/whep/live{query}", data=WHEP_OFFER, headers=SDP)
    assert response.status == 201, await response.text()
    return layer_url_of(response)


async def test_the_201_links_the_layer_url_and_post_selects_a_layer(
    client: tuple[TestClient, RouterHarness],
) -> None:
    http, _ = client
    layer_url = await new_viewer(http)
    response = await http.post(layer_url, data=b'{"mediaId":"1","rid":"f"}', headers=JSON)
    assert response.status == 200
    state = await response.json()
    assert state["automatic"] is False and state["rid"] == "f"
    # The older member name (M02-W01) and a spatial index work too.
    response = await http.post(layer_url, data=b'{"encodingId":"q"}', headers=JSON)
    assert (await response.json())["rid"] == "q"
    response = await http.post(layer_url, data=b'{"spatialLayerId":1}', headers=JSON)
    assert (await response.json())["rid"] == "h"
    listing = await (await http.get(layer_url)).json()
    assert [layer["rid"] for layer in listing["layers"]] == ["q", "h", "f"]
    assert [layer["width"] for layer in listing["layers"]] == [160, 320, 640]


@pytest.mark.parametrize("body", [b"{}", b'{"mediaId":"1"}', b""])
async def test_an_empty_request_or_delete_returns_to_automatic(
    client: tuple[TestClient, RouterHarness], body: bytes
) -> None:
    http, _ = client
    layer_url = await new_viewer(http)
    await http.post(layer_url, data=b'{"rid":"f"}', headers=JSON)
    response = await http.post(layer_url, data=body, headers=JSON)
    assert response.status == 200
    assert (await response.json())["automatic"] is True
    await http.post(layer_url, data=b'{"rid":"f"}', headers=JSON)
    response = await http.delete(layer_url)
    assert response.status == 200
    assert (await response.json())["automatic"] is True


async def test_with_a_public_url_the_session_url_and_its_links_are_absolute() -> None:
    """A cluster node (``public_url`` = its node URL) hands out absolute session URLs: a
    browser player placed here by another node's 307 resolves a relative one against the
    URL it first POSTed to, and would PATCH and DELETE that node instead."""
    h = RouterHarness()
    SimulcastPublisher(h, connect(h, SIMULCAST_OFFER, PUBLISHER, publish=True))
    node = "https://node-b.example:8443"
    app = create_app(router=h.router, clock=lambda: 1.0, options=HttpOptions(public_url=node))
    async with TestClient(TestServer(app)) as http:
        response = await http.post("/whep/live", data=WHEP_OFFER, headers=SDP)
        assert response.status == 201, await response.text()
        location = response.headers["Location"]
        assert re.fullmatch(rf"{re.escape(node)}/whep/live/[A-Za-z0-9_-]+", location)
        targets = {}
        for link in response.headers.getall("Link"):
            match = re.match(r'<([^>]+)>; rel="([^"]+)"', link)
            assert match is not None, link
            targets[match.group(2)] = match.group(1)
        assert targets == {EVENTS_REL: f"{location}/events", LAYER_REL: f"{location}/layer"}
        # The node still routes by path: the session is at the URL's path here.
        path = urllib.parse.urlsplit(location).path
        assert (await http.get(f"{path}/layer")).status == 200
        assert (await http.delete(path)).status == 200
    h.close()


@pytest.mark.parametrize(
    "body",
    [
        b'{"rid":"nope"}',
        b'{"spatialLayerId":7}',
        b'{"temporalLayerId":9}',
        b'{"mediaId":"0"}',  # the audio m-line
        b'{"maxWidth":-1}',
        b'{"rid":5}',
        b"[1,2]",
        b"{not json",
    ],
)
async def test_unknown_layers_and_bad_json_are_400_problems(
    client: tuple[TestClient, RouterHarness], body: bytes
) -> None:
    http, _ = client
    layer_url = await new_viewer(http)
    response = await http.post(layer_url, data=body, headers=JSON)
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    assert (await response.json())["status"] == 400


async def test_layer_requests_need_json_a_viewer_session_and_the_right_stream(
    client: tuple[TestClient, RouterHarness],
) -> None:
    http, h = client
    layer_url = await new_viewer(http)
    response = await http.post(layer_url, data=b"{}", headers={"Content-Type": "text/plain"})
    assert response.status == 415
    assert (await http.post("/whep/live/" + "x" * 32 + "/layer", json={})).status == 404
    assert (await http.post(layer_url.replace("/live/", "/other/"), json={})).status == 404
    publisher_id = h.router.streams["live"].publisher.id  # type: ignore[union-attr]
    assert (await http.post(f"/whep/live/{publisher_id}/layer", json={})).status == 404
    options = await http.options(layer_url, headers={"Access-Control-Request-Method": "POST"})
    assert options.status == 200
    assert "POST" in options.headers["Access-Control-Allow-Methods"]


async def test_the_whep_post_can_pick_the_first_layer_by_rid(
    client: tuple[TestClient, RouterHarness],
) -> None:
    http, h = client
    layer_url = await new_viewer(http, "?rid=q")
    assert (await (await http.get(layer_url)).json())["rid"] == "q"
    sessions = len(h.router.sessions)
    response = await http.post("/whep/live?rid=zz", data=WHEP_OFFER, headers=SDP)
    assert response.status == 400
    assert len(h.router.sessions) == sessions  # nothing left behind


def test_parse_layer_request_reads_every_member() -> None:
    body = orjson.dumps(
        {
            "mediaId": 1,
            "rid": "h",
            "spatialLayerId": 1,
            "temporalLayerId": 2,
            "maxSpatialLayerId": 2,
            "maxTemporalLayerId": 1,
            "maxWidth": 1280,
            "maxHeight": 720,
            "unknownMember": True,  # ignored
        }
    )
    assert parse_layer_request(body) == LayerRequest(
        media_id="1",
        rid="h",
        spatial_layer=1,
        temporal_layer=2,
        max_spatial_layer=2,
        max_temporal_layer=1,
        max_width=1280,
        max_height=720,
    )
    assert parse_layer_request(b"{}").automatic
    assert parse_layer_request(b'{"maxHeight": 360}').automatic


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=10,
)
members = st.sampled_from(
    ["mediaId", "rid", "encodingId", "spatialLayerId", "temporalLayerId", "maxWidth"]
)


@given(body=st.binary(max_size=200) | st.dictionaries(members, json_values).map(orjson.dumps))
def test_fuzzed_bodies_parse_or_raise_parse_error(body: bytes) -> None:
    try:
        request = parse_layer_request(body)
    except ParseError:
        return
    assert isinstance(request, LayerRequest)
