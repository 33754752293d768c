"""Headless Chromium publishes and plays through ``whepfan serve`` with UDP GSO on.

The module's server (conftest.py) runs with the default ``--gso auto``, which the
start-up probe turns on on this kernel; ``/metrics`` says which path the worker uses.
Chromium's packetizer splits a frame into packets within a byte of each other (libwebrtc
``SplitAboutEqually``), so this is also where the RTP padding that makes a run equal
(Fanout.push_batch) meets a real decoder: five Chromium viewers must keep decoding.
"""

from __future__ import annotations

import re
from typing import Any

from _harness import PUBLISH_TOKEN, VIEW_TOKEN

FRAMES = 60
VIEWERS = 5
PAGE_TIMEOUT_MS = 20_000

PLAY = """async ({endpoint, token, count, frames}) => {
  const { WhepPlayer } = await import("/static/whep.js");
  const players = [];
  for (let i = 0; i < count; i++) {
    const player = new WhepPlayer({ endpoint, token });
    const video = document.createElement("video");
    video.autoplay = true;
    video.muted = true;
    document.body.append(video);
    players.push(player.start().then((stream) => { video.srcObject = stream; return player; }));
  }
  const started = await Promise.all(players);
  window.gsoPlayers = started;
  return Promise.all(
    started.map((player) => __checks.waitForMedia(player.pc, { frames, timeoutMs: 40000 }))
  );
}"""

METRICS = """async () => (await fetch("/metrics")).text()"""


def _sample(exposition: str, name: str) -> float:
    return sum(
        float(match)
        for match in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", exposition, re.MULTILINE)
    )


def test_chromium_viewers_decode_a_chromium_publisher_sent_with_gso(
    server: str, context: Any
) -> None:
    publisher = context.new_page()
    publisher.goto(f"{server}/publish/gso#codec=VP8")
    publisher.fill("#token", PUBLISH_TOKEN)
    publisher.click("#start")
    publisher.wait_for_selector("body[data-state=live]", timeout=PAGE_TIMEOUT_MS)
    viewer = context.new_page()
    viewer.goto(f"{server}/")
    before = viewer.evaluate(METRICS)
    summaries = viewer.evaluate(
        PLAY,
        {"endpoint": f"{server}/whep/gso", "token": VIEW_TOKEN, "count": VIEWERS, "frames": FRAMES},
    )
    for summary in summaries:
        assert summary["framesDecoded"] >= FRAMES, summary
        assert summary["videoCodec"].lower() == "video/vp8", summary
    after = viewer.evaluate(METRICS)
    assert re.search(r'^whepfan_worker_send_path\{path="gso",worker="0"\} 1\.0$', after, re.M)
    sent = _sample(after, "whepfan_sent_packets_total") - _sample(
        before, "whepfan_sent_packets_total"
    )
    in_gso = _sample(after, "whepfan_gso_sent_packets_total") - _sample(
        before, "whepfan_gso_sent_packets_total"
    )
    # Chromium's frames went out as GSO runs: bursts of a frame's packets reached the
    # server's socket together and were made equal by padding where they differed.
    assert in_gso > 0, (sent, in_gso)
    print(f"Chromium publisher, {VIEWERS} viewers: {in_gso:.0f} of {sent:.0f} packets in GSO")
    viewer.evaluate("() => Promise.all(window.gsoPlayers.map((player) => player.stop()))")
    publisher.close()
    viewer.close()
