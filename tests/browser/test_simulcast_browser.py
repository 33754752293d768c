"""Chromium publishes three simulcast layers over WHIP (VP8, and H264) and Chromium
viewers switch between them through the WHEP layer extension (EXT §5): with the medooze
``WHEPClient.selectLayer`` and with the layer picker of whepfan's /watch page.

Each switch goes low -> high -> low; ``frameWidth`` of the viewer's inbound video must
follow within 2 s while ``framesDecoded`` keeps rising (no freeze), and the viewer must
never ask for a repair keyframe (``pliCount``: Chromium sends a PLI when a frame cannot
be decoded, e.g. a switch that forwarded a delta frame of the new layer first).

The environment (namespace, server, browser) is described in _harness.py; one server and
one browser serve the whole module.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from _harness import MEDOOZE_VIEW, PUBLISH_TOKEN, VIEW_TOKEN, open_context

CODECS = ["VP8", "H264"]
PAGE_TIMEOUT_MS = 20_000
# Chromium's bandwidth estimate starts low and ramps up; the top layer follows within
# seconds on the veth link (the server's REMB allows 6 Mbit/s, MediaConfig).
LAYERS_TIMEOUT_MS = 30_000
SWITCH_LIMIT_MS = 2_000  # issue 5: frameWidth follows within 2 s
# Frames decoded on the new layer before the next switch: about half a second.
FRAMES_AFTER_SWITCH = 15
# The publisher's encodings, lowest first (reference/clients.md): 320x180, 640x360, 1280x720.
CAMERA = {"width": 1280, "height": 720}
SEND_ENCODINGS = [
    {"rid": "q", "scaleResolutionDownBy": 4},
    {"rid": "h", "scaleResolutionDownBy": 2},
    {"rid": "f"},
]
SWITCHES = ["q", "f", "q"]

SIMULCAST_PUBLISH = """async ({endpoint, token, codec, camera, encodings}) => {
  const { WHIPClient } = await import("/medooze/whip.js");
  const { codecPreferences } = await import("/static/whip.js");
  const media = await navigator.mediaDevices.getUserMedia({ audio: true, video: camera });
  const pc = new RTCPeerConnection({ bundlePolicy: "max-bundle", iceServers: [] });
  pc.addTransceiver(media.getAudioTracks()[0], { direction: "sendonly", streams: [media] });
  const video = pc.addTransceiver(media.getVideoTracks()[0], {
    direction: "sendonly", streams: [media], sendEncodings: encodings,
  });
  video.setCodecPreferences(codecPreferences("video", codec));
  const client = new WHIPClient();
  await client.publish(pc, endpoint, token);
  window.publisher = { pc, client, media };
}"""


# One switch through medooze's client: selectLayer, then frameWidth must reach the
# layer's width, then the new layer must keep decoding.
MEDOOZE_SWITCH = """async ({rid, width, limitMs, frames}) => {
  const { pc, client } = window.viewer;
  const before = await __checks.video(pc);
  const started = performance.now();
  await client.selectLayer({ rid });
  const switched = await __checks.waitForVideo(
    pc, (video) => video.frameWidth === width, { timeoutMs: limitMs + 3000 });
  const switchMs = performance.now() - started;
  const settled = await __checks.waitForVideo(
    pc, (video) => video.framesDecoded >= switched.figures.framesDecoded + frames,
    { timeoutMs: 5000 });
  return { before, at: switched.figures, after: settled.figures, switchMs };
}"""

# The /watch page's picker: the time counts from the <select>'s change event (recorded
# by a listener added before the choice) to the first getStats() showing the new width.
RECORD_CHOICES = """() => {
  document.getElementById("layer").addEventListener("change", () => {
    window.layerChosenAt = performance.now();
  });
}"""

WAIT_FOR_WIDTH = """async ({width, limitMs, frames}) => {
  const pc = window.whepfan.player.pc;
  const switched = await __checks.waitForVideo(
    pc, (video) => video.frameWidth === width, { timeoutMs: limitMs + 3000 });
  const switchMs = performance.now() - window.layerChosenAt;
  const settled = await __checks.waitForVideo(
    pc, (video) => video.framesDecoded >= switched.figures.framesDecoded + frames,
    { timeoutMs: 5000 });
  return { at: switched.figures, after: settled.figures, switchMs };
}"""

STREAM_STATUS = """async ([stream, token]) => {
  const response = await fetch(`/api/streams/${stream}`,
    { headers: { Authorization: `Bearer ${token}` } });
  return response.ok ? response.json() : null;
}"""


@dataclass
class SimulcastPublication:
    stream: str
    codec: str
    page: Any
    # rid -> frame width the server measured from the layer's keyframes
    widths: dict[str, int]


def _video_layers(status: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The video layers of a stream status (``layers`` is keyed by m-line index; the
    publisher's video is the only entry with a list of layers)."""
    if not status:
        return []
    for layers in status.get("layers", {}).values():
        if isinstance(layers, list):
            return layers
    return []


def _all_layers_measured(page: Any, stream: str) -> list[dict[str, Any]]:
    """Wait until the server reports three layers with sizes and media flowing, the top
    one full size; on timeout, fail with what the publisher sends per rid and what the
    server saw (REMB/RR feedback to the publisher: router._stream_timer)."""
    started = time.monotonic()
    deadline = started + LAYERS_TIMEOUT_MS / 1000
    layers: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        layers = _video_layers(page.evaluate(STREAM_STATUS, [stream, VIEW_TOKEN]))
        widths = sorted(layer.get("width", 0) for layer in layers)
        flowing = all(layer["bitrate"] > 0 for layer in layers)
        if len(layers) == 3 and widths[-1] == CAMERA["width"] and all(widths) and flowing:
            print(
                f"\nall three layers measured {time.monotonic() - started:.1f} s after publishing"
            )
            return layers
        page.wait_for_timeout(250)
    sent = page.evaluate("() => __checks.outboundLayers(window.publisher.pc)")
    pytest.fail(f"the server did not measure three layers: {layers}; Chromium sends {sent}")


def publish_simulcast(page: Any, server: str, stream: str, codec: str) -> dict[str, int]:
    """Publish the fake camera from ``page`` as three layers; once the server measures
    all of them, their widths by rid."""
    page.goto(f"{server}/")
    page.evaluate(
        SIMULCAST_PUBLISH,
        {
            "endpoint": f"{server}/whip/{stream}",
            "token": PUBLISH_TOKEN,
            "codec": codec,
            "camera": CAMERA,
            "encodings": SEND_ENCODINGS,
        },
    )
    page.wait_for_function(
        "() => window.publisher.pc.connectionState === 'connected'", timeout=PAGE_TIMEOUT_MS
    )
    layers = _all_layers_measured(page, stream)
    widths = {layer["rid"]: layer["width"] for layer in layers}
    assert widths == {"q": 320, "h": 640, "f": 1280}, layers
    return widths


@pytest.fixture(scope="module", params=CODECS)
def simulcast(
    request: pytest.FixtureRequest, server: str, browser: Any
) -> Iterator[SimulcastPublication]:
    """Chromium's fake camera at 1280x720 published as three layers (q, h, f) in one
    codec, shared by the viewer tests of that codec, then unpublished."""
    codec = request.param
    stream = f"simulcast-{codec.lower()}"
    context = open_context(browser)
    page = context.new_page()
    widths = publish_simulcast(page, server, stream, codec)
    yield SimulcastPublication(stream, codec, page, widths)
    page.evaluate("() => window.publisher.client.stop()")
    context.close()


def _assert_switch(rid: str, width: int, result: dict[str, Any], switch_ms: float) -> None:
    """frameWidth reached the layer's width in time; decoding went on before, during
    and after the switch; no repair keyframe was needed; the picture never froze."""
    at, after = result["at"], result["after"]
    assert at["frameWidth"] == width, f"{rid}: frameWidth stayed {at['frameWidth']} ({result})"
    assert switch_ms <= SWITCH_LIMIT_MS, f"{rid}: switched after {switch_ms:.0f} ms ({result})"
    before = result.get("before")
    if before is not None:
        assert at["framesDecoded"] > before["framesDecoded"], result
    assert after["framesDecoded"] >= at["framesDecoded"] + FRAMES_AFTER_SWITCH, result
    assert after["frameWidth"] == width, result


def _assert_clean_decoding(first: dict[str, Any], last: dict[str, Any]) -> None:
    """Across all switches: no PLI (nothing undecodable), no frame dropped, no freeze."""
    for figure in ("pliCount", "framesDropped", "freezeCount"):
        assert last[figure] == first[figure], (figure, first, last)
    assert last["keyFramesDecoded"] >= first["keyFramesDecoded"] + len(SWITCHES), (first, last)


def test_medooze_select_layer_switches_low_high_low(
    server: str, context: Any, simulcast: SimulcastPublication
) -> None:
    page = context.new_page()
    page.goto(f"{server}/")
    page.evaluate(
        MEDOOZE_VIEW, {"endpoint": f"{server}/whep/{simulcast.stream}", "token": VIEW_TOKEN}
    )
    started = page.evaluate(
        """() => __checks.waitForVideo(window.viewer.pc,
             (video) => video.framesDecoded >= 30, { timeoutMs: 20000 })"""
    )
    assert started["reached"], started
    first = started["figures"]
    timings = []
    result: dict[str, Any] = {}
    for rid in SWITCHES:
        width = simulcast.widths[rid]
        result = page.evaluate(
            MEDOOZE_SWITCH,
            {"rid": rid, "width": width, "limitMs": SWITCH_LIMIT_MS, "frames": FRAMES_AFTER_SWITCH},
        )
        _assert_switch(rid, width, result, result["switchMs"])
        timings.append(f"{rid} {result['switchMs']:.0f} ms")
    _assert_clean_decoding(first, result["after"])
    print(f"\n{simulcast.codec} medooze selectLayer, time to new frameWidth: {', '.join(timings)}")
    page.evaluate("() => window.viewer.client.stop()")


def test_watch_page_layer_picker_switches_low_high_low(
    server: str, context: Any, simulcast: SimulcastPublication
) -> None:
    page = context.new_page()
    page.goto(f"{server}/watch/{simulcast.stream}#token={VIEW_TOKEN}")
    page.wait_for_selector("body[data-state=playing]", timeout=PAGE_TIMEOUT_MS)
    # The picker appears once the page has read the layers (it refreshes every 2 s).
    page.wait_for_selector("#layer-picker:not([hidden])", timeout=PAGE_TIMEOUT_MS)
    options = page.eval_on_selector_all("#layer option", "(all) => all.map((o) => o.value)")
    assert options == ["", "q", "h", "f"], options
    started = page.evaluate(
        """() => __checks.waitForVideo(window.whepfan.player.pc,
             (video) => video.framesDecoded >= 30, { timeoutMs: 20000 })"""
    )
    assert started["reached"], started
    first = started["figures"]
    page.evaluate(RECORD_CHOICES)
    timings = []
    result: dict[str, Any] = {}
    for rid in SWITCHES:
        width = simulcast.widths[rid]
        before = page.evaluate("() => __checks.video(window.whepfan.player.pc)")
        page.select_option("#layer", rid)
        result = page.evaluate(
            WAIT_FOR_WIDTH,
            {"width": width, "limitMs": SWITCH_LIMIT_MS, "frames": FRAMES_AFTER_SWITCH},
        )
        result["before"] = before
        _assert_switch(rid, width, result, result["switchMs"])
        timings.append(f"{rid} {result['switchMs']:.0f} ms")
        assert page.input_value("#layer") == rid
    _assert_clean_decoding(first, result["after"])
    print(f"\n{simulcast.codec} watch page picker, time to new frameWidth: {', '.join(timings)}")
