"""Headless Chromium behind a firewall that drops UDP to whepfan's media port: whepfan's
own watch and publish pages get through on a relayed candidate of Debian's coturn, with
the credentials whepfan's ``Link: rel="ice-server"`` fields carried (RFC 9725 §4.6).

The network is tests/_turn.py's (server and viewer namespaces); Chromium runs in the
viewer namespace, so the pages come from http://198.18.1.1:8080. That origin is not a
secure context, which getUserMedia needs: the browser treats it as one
(``--unsafely-treat-insecure-origin-as-secure``) for the publish page.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
from _harness import CHROMIUM, CHROMIUM_FLAGS, INSTALL_HINT, open_context
from _turn import (
    MEDIA_PORT,
    PUBLISH_TOKEN,
    SERVER_ADDRESS,
    STREAM,
    TURN_URL,
    LoggedProcess,
    Namespace,
    TurnNetwork,
    server_url,
    start_coturn,
    start_publisher,
    start_whepfan,
)

PAGE_TIMEOUT_MS = 30_000
FRAMES = 30

# The selected candidate pair of `pc` (W3C webrtc-stats: the transport's
# selectedCandidatePairId), with both candidates' type and address.
SELECTED_PAIR = """async (pc) => {
  const report = await pc.getStats();
  for (const stats of report.values()) {
    if (stats.type !== "transport" || !stats.selectedCandidatePairId) continue;
    const pair = report.get(stats.selectedCandidatePairId);
    const local = report.get(pair.localCandidateId);
    const remote = report.get(pair.remoteCandidateId);
    return {
      state: pair.state,
      local: { type: local.candidateType, address: local.address, url: local.url || "",
               relayProtocol: local.relayProtocol || "" },
      remote: { type: remote.candidateType, address: remote.address, port: remote.port },
    };
  }
  return null;
}"""


@pytest.fixture(scope="module")
def network() -> Iterator[TurnNetwork]:
    created = TurnNetwork.create(f"wfb-{os.getpid()}")
    yield created
    created.delete()


@pytest.fixture(scope="module")
def namespace(network: TurnNetwork) -> Namespace:
    """Where conftest.py's fixtures put Chromium: the firewalled viewer namespace."""
    return network.viewer


@pytest.fixture(scope="module")
def coturn(
    network: TurnNetwork, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoggedProcess]:
    turnserver = start_coturn(network, tmp_path_factory.mktemp("coturn"))
    yield turnserver
    turnserver.stop()


@pytest.fixture(scope="module")
def server(
    network: TurnNetwork, coturn: LoggedProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """whepfan with coturn's secret, and ``whepfan publish`` on STREAM."""
    state = tmp_path_factory.mktemp("whepfan")
    whepfan = start_whepfan(network, state)
    publisher = start_publisher(network, state)
    publisher.wait_for_output(r"publishing to ")
    yield server_url()
    publisher.stop()
    whepfan.stop()
    assert "Traceback" not in whepfan.log(), whepfan.log()[-4000:]


@pytest.fixture(scope="module")
def browser(namespace: Namespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """conftest.py's Chromium, also treating the server's plain-HTTP origin as secure."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"Playwright for Python is missing; {INSTALL_HINT}", pytrace=False)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing; {INSTALL_HINT}", pytrace=False)
    wrapper = tmp_path_factory.mktemp("chromium") / "chromium-in-namespace"
    wrapper.write_text(
        f'#!/bin/sh\nexec ip netns exec {namespace.name} {CHROMIUM} "$@"\n', encoding="utf-8"
    )
    wrapper.chmod(0o755)
    flags = [*CHROMIUM_FLAGS, f"--unsafely-treat-insecure-origin-as-secure={server_url()}"]
    playwright = sync_playwright().start()
    chromium = playwright.chromium.launch(executable_path=str(wrapper), headless=True, args=flags)
    yield chromium
    chromium.close()
    playwright.stop()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    created = open_context(browser)
    yield created
    created.close()


def _assert_relayed(page: Any, pc_expression: str) -> dict[str, Any]:
    pair: dict[str, Any] | None = page.evaluate(f"() => ({SELECTED_PAIR})({pc_expression})")
    assert pair is not None, "no selected candidate pair"
    assert pair["state"] == "succeeded", pair
    # Chromium's end is its relayed candidate on coturn, whepfan's its host candidate.
    assert pair["local"]["type"] == "relay", pair
    assert pair["local"]["address"] == SERVER_ADDRESS, pair
    assert pair["local"]["url"] == TURN_URL and pair["local"]["relayProtocol"] == "udp", pair
    assert pair["remote"]["type"] == "host", pair
    assert [pair["remote"]["address"], pair["remote"]["port"]] == [SERVER_ADDRESS, MEDIA_PORT]
    return pair


def _assert_allocated(coturn: LoggedProcess) -> None:
    """coturn verified whepfan's HMAC for a time-limited username (RFC 8656 §7.2)."""
    assert re.search(
        r"user <\d+:whepfan>: incoming packet ALLOCATE processed, success", coturn.log()
    ), coturn.log()[-4000:]


def test_watch_page_plays_through_turn_when_udp_to_the_server_is_blocked(
    server: str, context: Any, network: TurnNetwork, coturn: LoggedProcess
) -> None:
    page = context.new_page()
    page.goto(f"{server}/watch/{STREAM}")
    page.wait_for_selector("body[data-state=playing]", timeout=PAGE_TIMEOUT_MS)
    summary = page.evaluate(
        f"() => __checks.waitForMedia(window.whepfan.player.pc, {{frames: {FRAMES}}})"
    )
    assert summary["framesDecoded"] >= FRAMES and summary["frameWidth"] == 320, summary
    assert summary["audioSamples"] > 0, summary
    # The video keeps playing (more frames decode) on that one relayed pair.
    later = page.evaluate(
        "(n) => __checks.waitForMedia(window.whepfan.player.pc, {frames: n})",
        summary["framesDecoded"] + FRAMES,
    )
    assert later["framesDecoded"] >= summary["framesDecoded"] + FRAMES, (summary, later)
    _assert_relayed(page, "window.whepfan.player.pc")
    assert network.dropped_to_media_port() > 0  # its host candidate's checks went nowhere
    _assert_allocated(coturn)


def test_publish_page_publishes_through_turn_and_the_watch_page_plays_it(
    server: str, context: Any, coturn: LoggedProcess
) -> None:
    stream = "turn-browser"
    publish = context.new_page()
    publish.goto(f"{server}/publish/{stream}#codec=VP8")
    publish.fill("#token", PUBLISH_TOKEN)
    publish.click("#start")
    publish.wait_for_selector("body[data-state=live]", timeout=PAGE_TIMEOUT_MS)
    _assert_relayed(publish, "window.whepfan.publisher.pc")
    watch = context.new_page()
    watch.goto(f"{server}/watch/{stream}")
    watch.wait_for_selector("body[data-state=playing]", timeout=PAGE_TIMEOUT_MS)
    summary = watch.evaluate(
        f"() => __checks.waitForMedia(window.whepfan.player.pc, {{frames: {FRAMES}}})"
    )
    assert summary["framesDecoded"] >= FRAMES and summary["videoCodec"] == "video/VP8", summary
    _assert_relayed(watch, "window.whepfan.player.pc")
    _assert_allocated(coturn)
    publish.click("#stop")
    publish.wait_for_selector("body[data-state=stopped]")
