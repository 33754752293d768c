"""``whepfan demo`` (the README quick start's first command) serves a stream that plays
in /watch/{stream} in headless Chromium: video decodes and moves, audio arrives."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from _harness import NetworkNamespace, WhepfanProcess
from test_chromium import FRAMES, PAGE_TIMEOUT_MS, _assert_playing, _gray, _wait_for_media

DEMO_HTTP = "127.0.0.1:8090"


@pytest.fixture(scope="module")
def demo_watch_url(
    namespace: NetworkNamespace, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The watch URL ``whepfan demo`` prints. Only --http is given: the media address
    and the candidates are the demo's defaults (interface addresses)."""
    process = WhepfanProcess(
        namespace, ["demo", "--http", DEMO_HTTP], tmp_path_factory.mktemp("demo") / "demo.log"
    )
    match = process.wait_for_output(r"watch:\s+(http://\S+)")
    yield match.group(1)
    process.stop()
    assert "Traceback" not in process.log(), process.log()[-4000:]


def test_demo_stream_plays_in_the_watch_page(demo_watch_url: str, context: Any) -> None:
    assert demo_watch_url == f"http://{DEMO_HTTP}/watch/demo"
    page = context.new_page()
    page.goto(demo_watch_url)
    page.wait_for_selector("body[data-state=playing]", timeout=PAGE_TIMEOUT_MS)
    summary = _assert_playing(page, "window.whepfan.player.pc", "VP8")
    assert (summary["frameWidth"], summary["frameHeight"]) == (640, 360)
    # The pattern moves and its clock ticks: two screenshots a second apart differ.
    video = page.locator("#video")
    before = _gray(video.screenshot())
    _wait_for_media(page, "window.whepfan.player.pc", frames=summary["framesDecoded"] + FRAMES)
    after = _gray(video.screenshot())
    assert before.std() > 10 and after.std() > 10
    assert abs(after - before).mean() > 1.0
