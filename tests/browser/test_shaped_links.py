"""Chromium publishers and viewers on shaped links (issue 14 part 3).

The other browser tests run every client in the server's namespace, where media goes
over ``lo``. Here each shaped client gets a namespace of its own, joined to the server's
by a veth pair (``_harness.linked_namespace``) whose ends carry the shaping:

- the publisher's uplink is a 4 Mbit/s ``tbf``: a Chromium 3-layer simulcast publisher
  (1280x720 fake capture) must send all three layers within 5 s of connecting;
- a viewer's downlink is a 700 kbit/s ``tbf``: it must settle on the layer that fits
  within 10 s, never freezing for more than a second, while a viewer on an open link
  (the server's namespace) stays on the top layer;
- a viewer's downlink drops 5 % of UDP datagrams at random (iptables ``statistic``): it
  must keep decoding through NACK/RTX, and its residual loss is reported.

Every figure the assertions use is printed (``pytest -s``) for the issue note. The
publisher gets transport-wide cc feedback (media/twcc.py); with it Chromium encodes all
three layers within a second of connecting. The 700 kbit/s viewer test is an expected
failure until viewers get transport-wide cc too (see its comment).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _harness import (
    CHROMIUM,
    CHROMIUM_FLAGS,
    HTTP_PORT,
    NAMESPACE_ADDRESS,
    PUBLISH_TOKEN,
    VIEW_TOKEN,
    NetworkNamespace,
    WhepfanProcess,
    drop_randomly,
    linked_namespace,
    open_context,
    shape,
)
from test_simulcast_browser import CAMERA, SEND_ENCODINGS, SIMULCAST_PUBLISH, STREAM_STATUS

# Clients in other namespaces reach the server over their link, not on 127.0.0.1; a
# plain-HTTP origin there is not a secure context, which getUserMedia requires.
REMOTE_URL = f"http://{NAMESPACE_ADDRESS}:{HTTP_PORT}"
LOCAL_URL = f"http://127.0.0.1:{HTTP_PORT}"
STREAM = "shaped"
PUBLISHER_UPLINK = "4mbit"
SLOW_DOWNLINK_BPS = 700_000
LOSS = 0.05
EXPECTED_WIDTHS = {"q": 320, "h": 640, "f": 1280}
ALL_LAYERS_WITHIN = 5.0  # (a): seconds from 'connected' to three layers measured
SETTLE_WITHIN = 10.0  # (b): seconds from the viewer's POST to its last layer change
LONGEST_FREEZE = 1.0  # (b): seconds without a newly decoded frame
WATCH_SECONDS = 25.0  # how long (b) and (c) watch
# What a layer needs on the viewer's link besides its video: Opus at Chromium's default
# (~32-40 kbit/s) plus RTP/UDP/IP overhead on ~50 packets/s.
AUDIO_BPS = 60_000

# A medooze WHEP viewer that samples its inbound video every 100 ms into
# window.viewer.samples (t in ms from the POST; W3C webrtc-stats RTCInboundRtpStreamStats).
SAMPLED_VIEW = """async ({endpoint, token}) => {
  const { WHEPClient } = await import("/medooze/whep.js");
  const pc = new RTCPeerConnection({ bundlePolicy: "max-bundle", iceServers: [] });
  pc.addTransceiver("audio", { direction: "recvonly" });
  pc.addTransceiver("video", { direction: "recvonly" });
  const video = document.createElement("video");
  video.autoplay = true;
  video.muted = true;
  document.body.append(video);
  pc.ontrack = (event) => { video.srcObject = event.streams[0] || new MediaStream([event.track]); };
  const client = new WHEPClient();
  const startedAt = performance.now();
  await client.view(pc, endpoint, token);
  const samples = [];
  window.viewer = { pc, client, samples, stopped: false };
  (async () => {
    while (!window.viewer.stopped) {
      const report = await pc.getStats();
      for (const s of report.values()) {
        if (s.type !== "inbound-rtp" || s.kind !== "video") continue;
        samples.push({
          t: performance.now() - startedAt,
          framesDecoded: s.framesDecoded || 0,
          frameWidth: s.frameWidth || 0,
          packetsReceived: s.packetsReceived || 0,
          packetsLost: s.packetsLost || 0,
          nackCount: s.nackCount || 0,
          retransmitted: s.retransmittedPacketsReceived || 0,
          pliCount: s.pliCount || 0,
          bytesReceived: s.bytesReceived || 0,
          freezeCount: s.freezeCount || 0,
          totalFreezesDuration: s.totalFreezesDuration || 0,
        });
      }
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  })();
}"""


# Chromium's send-side bandwidth estimate (RTCIceCandidatePairStats.availableOutgoingBitrate).
OUTGOING_ESTIMATE = """async () => {
  const report = await window.publisher.pc.getStats();
  for (const s of report.values()) {
    if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") {
      return s.availableOutgoingBitrate || 0;
    }
  }
  return 0;
}"""


@dataclass
class Links:
    publisher: NetworkNamespace  # uplink shaped to PUBLISHER_UPLINK
    slow: NetworkNamespace  # downlink shaped to SLOW_DOWNLINK_BPS
    lossy: NetworkNamespace  # LOSS of arriving UDP dropped


@dataclass
class Publication:
    page: Any
    connected_to_all_layers: float | None  # seconds; None: not within 30 s
    layers: list[dict[str, Any]]
    sent: list[dict[str, Any]]  # what Chromium's encoder said it sends, per rid


@pytest.fixture(scope="module")
def server(namespace: NetworkNamespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``whepfan serve`` reachable from the linked namespaces (HTTP on every address)."""
    process = WhepfanProcess(
        namespace,
        [
            "serve",
            "--http",
            f"0.0.0.0:{HTTP_PORT}",
            "--allow-insecure-http",
            "--udp",
            "0.0.0.0:8189",
            "--public-ip",
            NAMESPACE_ADDRESS,
            "--publish-token",
            PUBLISH_TOKEN,
            "--view-token",
            VIEW_TOKEN,
        ],
        tmp_path_factory.mktemp("server") / "whepfan.log",
    )
    process.wait_for_output(r"WHEP on http://")
    yield LOCAL_URL
    process.stop()
    assert "internal error" not in process.log() and "Traceback" not in process.log(), (
        process.log()[-4000:]
    )


@pytest.fixture(scope="module")
def links(namespace: NetworkNamespace) -> Iterator[Links]:
    base = namespace.name
    created = Links(
        publisher=linked_namespace(namespace, f"{base}-p", 1),
        slow=linked_namespace(namespace, f"{base}-s", 2),
        lossy=linked_namespace(namespace, f"{base}-l", 3),
    )
    shape(created.publisher, "c0", PUBLISHER_UPLINK)  # what the publisher sends
    shape(namespace, "s2", f"{SLOW_DOWNLINK_BPS // 1000}kbit")  # what the slow viewer gets
    drop_randomly(created.lossy, LOSS)
    yield created
    for linked in (created.publisher, created.slow, created.lossy):
        linked.delete()


def _launch(browser: Any, namespace: NetworkNamespace, directory: Path) -> Any:
    """Another Chromium, in ``namespace``, from the module's Playwright."""
    wrapper = directory / f"chromium-{namespace.name}"
    wrapper.write_text(
        f'#!/bin/sh\nexec ip netns exec {namespace.name} {CHROMIUM} "$@"\n', encoding="utf-8"
    )
    wrapper.chmod(0o755)
    return browser.browser_type.launch(
        executable_path=str(wrapper),
        headless=True,
        args=[*CHROMIUM_FLAGS, f"--unsafely-treat-insecure-origin-as-secure={REMOTE_URL}"],
    )


@pytest.fixture(scope="module")
def remote_browsers(
    browser: Any, links: Links, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("chromium-linked")
    launched = {
        "publisher": _launch(browser, links.publisher, directory),
        "slow": _launch(browser, links.slow, directory),
        "lossy": _launch(browser, links.lossy, directory),
    }
    yield launched
    for each in launched.values():
        each.close()


def _video_layers(status: dict[str, Any] | None) -> list[dict[str, Any]]:
    for layers in (status or {}).get("layers", {}).values():
        if isinstance(layers, list):
            return layers
    return []


@pytest.fixture(scope="module")
def publication(server: str, remote_browsers: dict[str, Any]) -> Iterator[Publication]:
    """VP8 simulcast from the publisher's namespace; how long after 'connected' the server
    measured all three layers (waits up to 30 s so the viewer tests run either way)."""
    context = open_context(remote_browsers["publisher"])
    page = context.new_page()
    page.goto(f"{REMOTE_URL}/")
    page.evaluate(
        SIMULCAST_PUBLISH,
        {
            "endpoint": f"{REMOTE_URL}/whip/{STREAM}",
            "token": PUBLISH_TOKEN,
            "codec": "VP8",
            "camera": CAMERA,
            "encodings": SEND_ENCODINGS,
        },
    )
    page.wait_for_function(
        "() => window.publisher.pc.connectionState === 'connected'", timeout=20_000
    )
    connected = time.monotonic()
    elapsed: float | None = None
    layers: list[dict[str, Any]] = []
    estimates: list[str] = []
    while time.monotonic() - connected < 30.0:
        estimate = page.evaluate(OUTGOING_ESTIMATE)
        outbound = page.evaluate("() => __checks.outboundLayers(window.publisher.pc)")
        estimates.append(
            f"{time.monotonic() - connected:.1f}s {estimate / 1000:.0f}k "
            + "/".join(f"{x['rid']}{x['frameWidth']}:{x['framesEncoded']}" for x in outbound)
        )
        layers = _video_layers(page.evaluate(STREAM_STATUS, [STREAM, VIEW_TOKEN]))
        estimates[-1] += " server " + "/".join(
            f"{x['rid']}{x.get('width', 0)}:{x['bitrate'] // 1000}k" for x in layers
        )
        # Chromium encodes each rid at its size, and the server has each layer's
        # keyframe (its width). The status's bitrates come from the SSE layers event,
        # refreshed only every 5 s when the layer shapes do not change (layers.py), so
        # they are printed, not waited for.
        encoding = {x["rid"]: x["frameWidth"] for x in outbound if x["framesEncoded"] > 0}
        widths = sorted(layer.get("width", 0) for layer in layers)
        if encoding == EXPECTED_WIDTHS and widths == sorted(EXPECTED_WIDTHS.values()):
            elapsed = time.monotonic() - connected
            break
        time.sleep(0.1)
    sent = page.evaluate("() => __checks.outboundLayers(window.publisher.pc)")
    print(
        f"\n(a) {PUBLISHER_UPLINK} uplink: three layers sent and measured "
        f"{'never (30 s)' if elapsed is None else f'{elapsed:.1f} s'} after connecting; "
        f"server: {[(x['rid'], x.get('width'), x['bitrate']) for x in layers]}; "
        f"Chromium: {[(x['rid'], x['frameWidth'], x['targetBitrate']) for x in sent]}"
        f"\n(a) Chromium's send-side estimate: {', '.join(estimates[::2])}"
    )
    yield Publication(page, elapsed, layers, sent)
    page.evaluate("() => window.publisher.client.stop()")
    context.close()


def _start_viewer(browser: Any, base: str) -> tuple[Any, Any]:
    context = open_context(browser)
    page = context.new_page()
    page.goto(f"{base}/")
    page.evaluate(SAMPLED_VIEW, {"endpoint": f"{base}/whep/{STREAM}", "token": VIEW_TOKEN})
    return context, page


def _finish_viewer(context: Any, page: Any) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = page.evaluate(
        "() => { window.viewer.stopped = true; window.viewer.client.stop(); "
        "return window.viewer.samples; }"
    )
    context.close()
    return samples


@dataclass(frozen=True)
class Watched:
    first_frame: float  # seconds from the POST
    longest_freeze: float  # seconds without a new decoded frame, after the first
    changes: list[tuple[float, int]]  # (seconds, frameWidth) at each change
    last: dict[str, Any]
    received_bps: float  # video bytes over the last 10 s of samples

    @property
    def settled_at(self) -> float:
        return self.changes[-1][0]

    @property
    def width(self) -> int:
        return self.changes[-1][1]

    def timeline(self) -> str:
        return ", ".join(f"{width} at {t:.1f} s" for t, width in self.changes)


def _watched(samples: list[dict[str, Any]]) -> Watched:
    decoding = [s for s in samples if s["framesDecoded"] > 0]
    assert decoding, f"the viewer never decoded a frame: {samples[-3:]}"
    longest = 0.0
    last_new = decoding[0]
    changes: list[tuple[float, int]] = []
    for sample in decoding:
        if sample["framesDecoded"] > last_new["framesDecoded"]:
            last_new = sample
        longest = max(longest, (sample["t"] - last_new["t"]) / 1000)
        if sample["frameWidth"] and (not changes or changes[-1][1] != sample["frameWidth"]):
            changes.append((sample["t"] / 1000, sample["frameWidth"]))
    tail = [s for s in samples if s["t"] >= samples[-1]["t"] - 10_000]
    span = (tail[-1]["t"] - tail[0]["t"]) / 1000
    received = (tail[-1]["bytesReceived"] - tail[0]["bytesReceived"]) * 8 / span if span else 0.0
    return Watched(decoding[0]["t"] / 1000, longest, changes, samples[-1], received)


def test_publisher_behind_4_mbit_sends_all_three_layers_within_5_s(
    publication: Publication,
) -> None:
    assert publication.connected_to_all_layers is not None, (publication.layers, publication.sent)
    assert publication.connected_to_all_layers <= ALL_LAYERS_WITHIN, (
        publication.connected_to_all_layers,
        publication.layers,
        publication.sent,
    )


def _layer_decisions(page: Any) -> str:
    """The server's layer moves and headroom probes so far (its /metrics, fetched by a
    page: the server is in the test's network namespace), for the report."""
    text: str = page.evaluate("async () => (await fetch('/metrics')).text()")
    wanted = ("whepfan_layer_moves_total{", "whepfan_headroom_probes_total{")
    counted = [
        line.split("{", 1)[1].replace('worker="0",', "").replace("}", "").strip()
        for line in text.splitlines()
        if line.startswith(wanted) and not line.endswith(" 0.0")
    ]
    return "; ".join(counted) or "none"


def _layer_that_fits(layers: list[dict[str, Any]], link_bps: int) -> int:
    """The widest layer whose measured rate, with the audio, fits the link."""
    fitting = [x["width"] for x in layers if x["bitrate"] + AUDIO_BPS <= link_bps]
    return max(fitting) if fitting else min(x["width"] for x in layers)


# Measured 2026-12-04 with transport-wide cc to viewers (media/headroom.py), four runs: the
# 700 kbit/s viewer stays on the layer that fits from its first frame (0.2 s; freezes
# <= 0.13 s); its probes of the top layer fail on over-use and double its wait, without a
# freeze. The open viewer moves to the top at 6.9 s, when its first headroom probe (after
# the policy's 5 s of clean reports) succeeds. Before it (RR loss and REMB only) both went
# up after 5 s and down again 2 s later: a REMB shows no room before the layer flows.
def test_viewer_behind_700_kbit_settles_on_the_layer_that_fits_while_an_open_viewer_stays_on_top(
    browser: Any, remote_browsers: dict[str, Any], publication: Publication
) -> None:
    slow = _start_viewer(remote_browsers["slow"], REMOTE_URL)
    open_ = _start_viewer(browser, LOCAL_URL)
    time.sleep(WATCH_SECONDS)
    layers = _video_layers(publication.page.evaluate(STREAM_STATUS, [STREAM, VIEW_TOKEN]))
    estimate = publication.page.evaluate(OUTGOING_ESTIMATE)
    slow_watched = _watched(_finish_viewer(*slow))
    open_watched = _watched(_finish_viewer(*open_))
    fits = _layer_that_fits(layers, SLOW_DOWNLINK_BPS)
    print(
        f"\n(b) publisher's estimate {estimate / 1000:.0f} kbit/s; layers "
        f"{[(x['rid'], x.get('width'), x['bitrate']) for x in layers]}; "
        f"{fits} fits {SLOW_DOWNLINK_BPS // 1000} kbit/s"
        f"\n(b) 700 kbit/s viewer: first frame {slow_watched.first_frame:.1f} s, "
        f"{slow_watched.timeline()}; longest freeze {slow_watched.longest_freeze:.2f} s; "
        f"receiving {slow_watched.received_bps / 1000:.0f} kbit/s; {slow_watched.last}"
        f"\n(b) open viewer: first frame {open_watched.first_frame:.1f} s, "
        f"{open_watched.timeline()}; longest freeze {open_watched.longest_freeze:.2f} s; "
        f"receiving {open_watched.received_bps / 1000:.0f} kbit/s"
        f"\n(b) server: {_layer_decisions(publication.page)}"
    )
    assert slow_watched.width == fits, slow_watched
    assert slow_watched.settled_at <= SETTLE_WITHIN, slow_watched
    assert slow_watched.longest_freeze <= LONGEST_FREEZE, slow_watched
    assert open_watched.width == max(x["width"] for x in layers), open_watched


def test_viewer_with_5_percent_loss_keeps_decoding_through_nack_and_rtx(
    remote_browsers: dict[str, Any], publication: Publication
) -> None:
    lossy = _start_viewer(remote_browsers["lossy"], REMOTE_URL)
    time.sleep(WATCH_SECONDS)
    samples = _finish_viewer(*lossy)
    watched = _watched(samples)
    last = watched.last
    # packetsLost counts what the link dropped: libwebrtc marks a packet restored from
    # RTX as recovered and leaves it out of the RFC 3550 counts. What NACK/RTX did not
    # repair is the loss less the retransmissions received (W3C webrtc-stats
    # retransmittedPacketsReceived).
    expected = max(last["packetsLost"] + last["packetsReceived"], 1)
    dropped = last["packetsLost"] / expected
    residual = max(last["packetsLost"] - last["retransmitted"], 0) / expected
    print(
        f"\n(c) {LOSS:.0%} random loss: first frame {watched.first_frame:.1f} s, "
        f"{watched.timeline()}; longest freeze {watched.longest_freeze:.2f} s; "
        f"{last['nackCount']} NACKs, {last['pliCount']} PLIs; dropped {dropped:.2%} "
        f"({last['packetsLost']} of {expected}), {last['retransmitted']} retransmissions "
        f"received, residual loss {residual:.2%}; "
        f"{last['framesDecoded']} frames, {last['freezeCount']} freezes "
        f"({last['totalFreezesDuration']:.1f} s)"
    )
    # Decoding went on to the end: a frame decoded in the last second of watching.
    recent = [s for s in samples if s["t"] >= samples[-1]["t"] - 1000]
    assert recent[-1]["framesDecoded"] > recent[0]["framesDecoded"], recent
    assert watched.longest_freeze <= LONGEST_FREEZE, watched
    assert last["nackCount"] > 0, last
    # NACK/RTX repaired most of what the link dropped (each retransmission is itself
    # dropped with the same probability, and asked for again).
    assert residual < LOSS / 2, (residual, last)
