"""Headless Chromium against ``whepfan serve``: whepfan's own pages and the medooze
``whip-whep`` client publish (fake camera + mic over WHIP) and play (WHEP), and Eyevinn's
``webrtc-player`` plays, for VP8 and H264; time to first frame; DELETE frees the
session; 20 viewers in one page; a screenshot of /watch/{stream} that shows moving video.

One server and one browser serve the whole module (see conftest.py); each test opens
its own pages and uses its own stream names.
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from _harness import (
    EYEVINN_VIEW,
    HTTP_PORT,
    MEDOOZE_VIEW,
    PUBLISH_TOKEN,
    VIEW_TOKEN,
    open_context,
    wait_until,
)

# Enough decoded frames to prove a steady picture (about a second of fake camera).
FRAMES = 30
PAGE_TIMEOUT_MS = 20_000
TIME_TO_FIRST_FRAME_VIEWERS = 5
# More than whepfan's default keyframe request interval (MediaConfig, 0.5 s).
JOIN_SPACING_MS = 600
MANY_VIEWERS = 20

PUBLISHERS = ["page", "medooze"]
CODECS = ["VP8", "H264"]

MEDOOZE_PUBLISH = """async ({endpoint, token, codec}) => {
  const { WHIPClient } = await import("/medooze/whip.js");
  const { codecPreferences } = await import("/static/whip.js");
  const media = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
  const pc = new RTCPeerConnection({ bundlePolicy: "max-bundle", iceServers: [] });
  for (const track of media.getTracks()) {
    const transceiver = pc.addTransceiver(track, { direction: "sendonly", streams: [media] });
    if (track.kind === "video") transceiver.setCodecPreferences(codecPreferences("video", codec));
  }
  const client = new WHIPClient();
  await client.publish(pc, endpoint, token);
  window.medooze = { pc, client };
}"""


# Viewers started one after another with whepfan's client; for each, milliseconds from
# its WHEP POST to its first decoded frame. Each arrives `spacingMs` after the previous
# one left, so that each measures a lone join: whepfan asks the publisher for at most
# one keyframe per 0.5 s per stream, and a viewer arriving right behind another waits
# out that interval (measured too, and printed as "back to back").
TIME_TO_FIRST_FRAME = """async ({endpoint, token, count, spacingMs}) => {
  const { WhepPlayer } = await import("/static/whep.js");
  const delays = [];
  for (let i = 0; i < count; i++) {
    const player = new WhepPlayer({ endpoint, token });
    const video = document.createElement("video");
    video.autoplay = true;
    video.muted = true;
    document.body.append(video);
    video.srcObject = await player.start();
    delays.push(await __checks.firstFrameDelay(player.pc, player.postedAt));
    await player.stop();
    video.remove();
    await new Promise((resolve) => setTimeout(resolve, spacingMs));
  }
  return delays;
}"""

MANY_IN_ONE_PAGE = """async ({endpoint, token, count, frames}) => {
  const { WhepPlayer } = await import("/static/whep.js");
  const players = [];
  for (let i = 0; i < count; i++) {
    const player = new WhepPlayer({ endpoint, token });
    const video = document.createElement("video");
    video.autoplay = true;
    video.muted = true;
    video.width = 96;
    document.body.append(video);
    players.push(player.start().then((stream) => { video.srcObject = stream; return player; }));
  }
  const started = await Promise.all(players);
  const summaries = await Promise.all(
    started.map((player) => __checks.waitForMedia(player.pc, { frames, timeoutMs: 30000 }))
  );
  const statuses = await Promise.all(started.map((player) => player.stop()));
  return { summaries, statuses };
}"""


def _endpoint(server: str, protocol: str, stream: str) -> str:
    return f"{server}/{protocol}/{stream}"


def _wait_for_media(page: Any, pc_expression: str, frames: int = FRAMES) -> dict[str, Any]:
    summary: dict[str, Any] = page.evaluate(
        f"() => __checks.waitForMedia({pc_expression}, {{frames: {frames}}})"
    )
    return summary


def _assert_playing(page: Any, pc_expression: str, codec: str) -> dict[str, Any]:
    """Video frames decode and keep decoding; audio samples arrive; the codec is right."""
    first = _wait_for_media(page, pc_expression)
    assert first["framesDecoded"] >= FRAMES, first
    assert first["audioPackets"] > 0 and first["audioSamples"] > 0, first
    assert first["videoCodec"].lower() == f"video/{codec}".lower(), first
    assert first["audioCodec"].lower() == "audio/opus", first
    assert first["frameWidth"] > 0 and first["frameHeight"] > 0, first
    later = _wait_for_media(page, pc_expression, frames=first["framesDecoded"] + FRAMES)
    assert later["framesDecoded"] >= first["framesDecoded"] + FRAMES, (first, later)
    assert later["audioSamples"] > first["audioSamples"], (first, later)
    return later


def _stream_listing(page: Any) -> dict[str, Any]:
    listing: dict[str, Any] = page.evaluate(
        """async (token) => (await fetch("/api/streams",
             { headers: { Authorization: `Bearer ${token}` } })).json()""",
        VIEW_TOKEN,
    )
    return listing


def _status_of(page: Any, url: str) -> int:
    status: int = page.evaluate(
        """async ([url, token]) => (await fetch(url,
             { headers: { Authorization: `Bearer ${token}` } })).status""",
        [url, VIEW_TOKEN],
    )
    return status


def _gray(png: bytes) -> np.ndarray:
    with av.open(io.BytesIO(png), mode="r", format="png_pipe") as container:
        frame = next(container.decode(video=0))
    return frame.to_ndarray(format="gray").astype(np.int16)


@dataclass
class Publication:
    stream: str
    codec: str
    page: Any
    pc_expression: str


def _publish_with_page(context: Any, server: str, stream: str, codec: str) -> Publication:
    page = context.new_page()
    page.goto(f"{server}/publish/{stream}#codec={codec}")
    # The token goes in through the form field (the watch tests use the fragment).
    page.fill("#token", PUBLISH_TOKEN)
    page.click("#start")
    page.wait_for_selector("body[data-state=live]", timeout=PAGE_TIMEOUT_MS)
    return Publication(stream, codec, page, "window.whepfan.publisher.pc")


def _publish_with_medooze(context: Any, server: str, stream: str, codec: str) -> Publication:
    page = context.new_page()
    page.goto(f"{server}/")
    page.evaluate(
        MEDOOZE_PUBLISH,
        {"endpoint": _endpoint(server, "whip", stream), "token": PUBLISH_TOKEN, "codec": codec},
    )
    page.wait_for_function(
        "() => window.medooze.pc.connectionState === 'connected'", timeout=PAGE_TIMEOUT_MS
    )
    return Publication(stream, codec, page, "window.medooze.pc")


@pytest.fixture(scope="module", params=[(p, c) for p in PUBLISHERS for c in CODECS], ids="-".join)
def publication(request: pytest.FixtureRequest, server: str, browser: Any) -> Iterator[Publication]:
    """Chromium's fake camera and mic published over WHIP by one client in one codec,
    shared by the viewer tests of that combination, then unpublished."""
    client, codec = request.param
    stream = f"{client}-{codec.lower()}"
    context = open_context(browser)
    start = _publish_with_page if client == "page" else _publish_with_medooze
    published = start(context, server, stream, codec)
    sent_codec = published.page.evaluate(f"() => __checks.outboundCodec({published.pc_expression})")
    assert sent_codec.lower() == f"video/{codec}".lower()
    yield published
    if client == "page":
        published.page.click("#stop")
        published.page.wait_for_selector("body[data-state=stopped]")
    else:
        published.page.evaluate("() => window.medooze.client.stop()")
    context.close()


def test_whepfan_watch_page_plays_what_each_client_publishes(
    server: str, context: Any, publication: Publication
) -> None:
    page = context.new_page()
    page.goto(f"{server}/watch/{publication.stream}#token={VIEW_TOKEN}")
    page.wait_for_selector("body[data-state=playing]", timeout=PAGE_TIMEOUT_MS)
    summary = _assert_playing(page, "window.whepfan.player.pc", publication.codec)
    # The stats line reads getStats(): resolution, frame rate, bitrate, loss, delay.
    page.wait_for_function(
        "() => document.getElementById('stats').textContent.includes('fps')",
        timeout=PAGE_TIMEOUT_MS,
    )
    stats_line = page.inner_text("#stats")
    assert f"{summary['frameWidth']}x{summary['frameHeight']}" in stats_line
    assert "kbit/s" in stats_line and "loss" in stats_line and "playout delay" in stats_line


def test_medooze_whep_client_plays_what_each_client_publishes(
    server: str, context: Any, publication: Publication
) -> None:
    page = context.new_page()
    page.goto(f"{server}/")
    page.evaluate(
        MEDOOZE_VIEW,
        {"endpoint": _endpoint(server, "whep", publication.stream), "token": VIEW_TOKEN},
    )
    _assert_playing(page, "window.viewer.pc", publication.codec)
    viewers_before = _stream_listing(page)["viewers"]
    # The medooze client's stop() closes its peer connection (DTLS close_notify, which
    # ends the session on the server) and then DELETEs: 200, or 404 when the
    # close_notify won the race. Either way the server has freed the session.
    with page.expect_response(lambda r: r.request.method == "DELETE") as deleted:
        page.evaluate("() => window.viewer.client.stop()")
    assert deleted.value.status in (200, 404)
    assert _stream_listing(page)["viewers"] == viewers_before - 1


def test_eyevinn_player_plays_what_each_client_publishes(
    server: str, context: Any, publication: Publication
) -> None:
    """Eyevinn's WHEP adapter (0.13.0) does not trickle: it waits for ICE gathering to
    complete (at most 2 s) and POSTs an offer that carries its candidates, and sends no
    PATCH. unload() DELETEs the session before it closes the peer connection, so the
    DELETE finds the session live: exactly 200."""
    endpoint = _endpoint(server, "whep", publication.stream)
    page = context.new_page()
    page.goto(f"{server}/")
    methods: list[str] = []
    page.on(
        "request",
        lambda request: methods.append(request.method) if "/whep/" in request.url else None,
    )
    with page.expect_request(lambda r: r.method == "POST" and r.url == endpoint) as posted:
        page.evaluate(EYEVINN_VIEW, {"endpoint": endpoint, "token": VIEW_TOKEN})
    assert "a=candidate:" in (posted.value.post_data or "")
    assert posted.value.headers["authorization"] == f"Bearer {VIEW_TOKEN}"
    _assert_playing(page, "window.eyevinn.player.peer", publication.codec)
    session_url = page.evaluate("() => window.eyevinn.player.adapter.resource")
    assert session_url.startswith(f"{endpoint}/")
    viewers_before = _stream_listing(page)["viewers"]
    with page.expect_response(lambda r: r.request.method == "DELETE") as deleted:
        page.evaluate("() => window.eyevinn.player.unload()")
    assert (deleted.value.url, deleted.value.status) == (session_url, 200)
    assert _stream_listing(page)["viewers"] == viewers_before - 1
    assert methods == ["POST", "DELETE"], methods


@pytest.fixture(scope="module")
def vp8_stream(server: str, browser: Any) -> Iterator[str]:
    """One VP8 publication from whepfan's publish page, shared by the tests below."""
    context = open_context(browser)
    published = _publish_with_page(context, server, "shared-vp8", "VP8")
    # Wait until the publisher is well under way, as a viewer arriving later would.
    wait_until(
        published.page,
        "async () => (await window.whepfan.publisher.stats())"
        ".layers.some((layer) => layer.framesEncoded > 30)",
        timeout=PAGE_TIMEOUT_MS / 1000,
    )
    yield published.stream
    context.close()


def test_time_to_first_frame_median_over_five_viewers(
    server: str, context: Any, vp8_stream: str
) -> None:
    page = context.new_page()
    page.goto(f"{server}/")
    endpoint = _endpoint(server, "whep", vp8_stream)
    figures = {}
    for label, spacing in (("spaced", JOIN_SPACING_MS), ("back to back", 0)):
        delays = page.evaluate(
            TIME_TO_FIRST_FRAME,
            {
                "endpoint": endpoint,
                "token": VIEW_TOKEN,
                "count": TIME_TO_FIRST_FRAME_VIEWERS,
                "spacingMs": spacing,
            },
        )
        assert None not in delays, f"some viewers decoded no frame ({label}): {delays}"
        figures[label] = delays
    for label, delays in figures.items():
        shown = ", ".join(f"{delay:.0f}" for delay in delays)
        print(
            f"\ntime from WHEP POST to first decoded frame (Chromium, {len(delays)} viewers "
            f"{label}): median {statistics.median(delays):.0f} ms (target < 500 ms); "
            f"each: {shown} ms"
        )


def test_stopping_the_player_sends_delete_and_frees_the_session(
    server: str, context: Any, vp8_stream: str
) -> None:
    page = context.new_page()
    page.goto(f"{server}/watch/{vp8_stream}#token={VIEW_TOKEN}")
    page.wait_for_selector("body[data-state=playing]", timeout=PAGE_TIMEOUT_MS)
    _wait_for_media(page, "window.whepfan.player.pc", frames=1)
    session_url = page.evaluate("() => window.whepfan.player.sessionUrl")
    assert session_url.startswith(f"{server}/whep/{vp8_stream}/")
    assert _status_of(page, session_url) == 204
    viewers_before = _stream_listing(page)["viewers"]
    with page.expect_response(lambda r: r.request.method == "DELETE") as deleted:
        page.click("#stop")
    assert deleted.value.url == session_url
    assert deleted.value.status == 200
    page.wait_for_selector("body[data-state=stopped]")
    # The server freed it: the session URL is gone and the viewer count dropped.
    assert _status_of(page, session_url) == 404
    assert _stream_listing(page)["viewers"] == viewers_before - 1


def test_closing_the_watch_page_ends_the_session(
    server: str, context: Any, vp8_stream: str
) -> None:
    watcher = context.new_page()
    watcher.goto(f"{server}/watch/{vp8_stream}#token={VIEW_TOKEN}")
    watcher.wait_for_selector("body[data-state=playing]", timeout=PAGE_TIMEOUT_MS)
    session_url = watcher.evaluate("() => window.whepfan.player.sessionUrl")
    observer = context.new_page()
    observer.goto(f"{server}/")
    assert _status_of(observer, session_url) == 204
    # pagehide sends the DELETE with keepalive, so it outlives the page.
    watcher.close(run_before_unload=True)
    wait_until(
        observer,
        """async ([url, token]) => (await fetch(url,
             { headers: { Authorization: `Bearer ${token}` } })).status === 404""",
        [session_url, VIEW_TOKEN],
        timeout=PAGE_TIMEOUT_MS / 1000,
    )


def test_twenty_viewers_in_one_page_all_decode(server: str, context: Any, vp8_stream: str) -> None:
    page = context.new_page()
    page.goto(f"{server}/")
    viewers_before = _stream_listing(page)["viewers"]
    result = page.evaluate(
        MANY_IN_ONE_PAGE,
        {
            "endpoint": _endpoint(server, "whep", vp8_stream),
            "token": VIEW_TOKEN,
            "count": MANY_VIEWERS,
            "frames": FRAMES,
        },
    )
    decoded = [summary["framesDecoded"] for summary in result["summaries"]]
    assert all(frames >= FRAMES for frames in decoded), decoded
    assert all(summary["audioSamples"] > 0 for summary in result["summaries"])
    assert result["statuses"] == [200] * MANY_VIEWERS
    # All twenty are gone. A viewer left by an earlier test of the module may end meanwhile
    # (its page closed, its session times out), so the count may drop, never grow.
    assert _stream_listing(page)["viewers"] <= viewers_before


def test_watch_page_screenshot_shows_moving_video(
    server: str, context: Any, vp8_stream: str, tmp_path: Path
) -> None:
    page = context.new_page()
    page.goto(f"{server}/watch/{vp8_stream}#token={VIEW_TOKEN}")
    page.wait_for_selector("body[data-state=playing]", timeout=PAGE_TIMEOUT_MS)
    first = _wait_for_media(page, "window.whepfan.player.pc", frames=FRAMES)
    video = page.locator("#video")
    before = _gray(video.screenshot())
    _wait_for_media(page, "window.whepfan.player.pc", frames=first["framesDecoded"] + FRAMES)
    after = _gray(video.screenshot())
    page.screenshot(path=str(tmp_path / "watch-page.png"))  # kept for a human to look at
    # Non-blank: the picture has real contrast, not one flat colour...
    assert before.std() > 10 and after.std() > 10, (before.std(), after.std())
    # ...and it moves: a second later the pixels differ.
    assert np.abs(after - before).mean() > 1.0


def test_watch_page_plays_cross_origin(server: str, context: Any, vp8_stream: str) -> None:
    """The page at one origin (localhost) drives the WHEP endpoint of another
    (127.0.0.1): CORS preflight, exposed Location/ETag, token from the fragment."""
    endpoint = _endpoint(server, "whep", vp8_stream)
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(f"{request.method} {request.url}"))
    page.goto(
        f"http://localhost:{HTTP_PORT}/watch/{vp8_stream}#endpoint={endpoint}&token={VIEW_TOKEN}"
    )
    page.wait_for_selector("body[data-state=playing]", timeout=PAGE_TIMEOUT_MS)
    assert f"POST {endpoint}" in requests
    assert page.evaluate("() => window.whepfan.player.sessionUrl").startswith(endpoint + "/")
    _assert_playing(page, "window.whepfan.player.pc", "VP8")


def test_index_page_lists_live_streams(server: str, context: Any, vp8_stream: str) -> None:
    page = context.new_page()
    page.goto(f"{server}/#token={VIEW_TOKEN}")
    link = page.locator(f"#streams a[href^='/watch/{vp8_stream}']")
    link.wait_for(timeout=PAGE_TIMEOUT_MS)
    assert link.get_attribute("href") == f"/watch/{vp8_stream}#token={VIEW_TOKEN}"
    # Without the view token the list is refused, and the page says so.
    page.goto(f"{server}/")
    page.reload()
    page.wait_for_selector("body[data-state=error]", timeout=PAGE_TIMEOUT_MS)
    assert "401" in page.inner_text("#status")
