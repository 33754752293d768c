"""The pages' rough edges a new user hit (issue 13), in headless Chromium against
``whepfan serve``: the layer picker stays hidden on a single-layer stream, every page
has an icon (no 404 for /favicon.ico), a refused publish turns the camera off, and a
publish that cannot connect says what it tried.

Each test asserts what a user would have seen: the picker's computed style and box, the
page's network log, the capture tracks' ``readyState``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _harness import PUBLISH_TOKEN, VIEW_TOKEN, NetworkNamespace, WhepfanProcess, open_context

PAGE_TIMEOUT_MS = 20_000
# layers.js reads the layers every 2 s; one read and the next are awaited, not slept on.
LAYER_READS = 2

# Every MediaStream getUserMedia hands the page, for the test to inspect after the page
# has let go of it (installed before the page's own scripts run).
RECORD_CAPTURES = """(() => {
  const devices = navigator.mediaDevices;
  const original = devices.getUserMedia.bind(devices);
  window.__captured = [];
  devices.getUserMedia = async (constraints) => {
    const media = await original(constraints);
    window.__captured.push(media);
    return media;
  };
})()"""


def _publish_with_page(context: Any, server: str, stream: str) -> Any:
    page = context.new_page()
    page.goto(f"{server}/publish/{stream}#token={PUBLISH_TOKEN}&codec=VP8")
    page.click("#start")
    page.wait_for_selector("body[data-state=live]", timeout=PAGE_TIMEOUT_MS)
    return page


@pytest.fixture(scope="module")
def single_layer_stream(server: str, browser: Any) -> Iterator[str]:
    """Chromium's fake camera published by the /publish page, one encoding (no simulcast)."""
    context = open_context(browser)
    page = _publish_with_page(context, server, "single-layer")
    yield "single-layer"
    page.click("#stop")
    page.wait_for_selector("body[data-state=stopped]")
    context.close()


FETCH_HEAD = """async (url) => {
  const response = await fetch(url);
  const bytes = new Uint8Array(await response.arrayBuffer());
  return { status: response.status, type: response.headers.get("content-type"),
           head: [...bytes.slice(0, 5)] };
}"""

PICKER_STATE = """() => {
  const picker = document.getElementById("layer-picker");
  const box = picker.getBoundingClientRect();
  return { hidden: picker.hidden, display: getComputedStyle(picker).display,
           width: box.width, height: box.height };
}"""


def test_watch_page_hides_the_layer_picker_on_a_single_layer_stream(
    server: str, context: Any, single_layer_stream: str
) -> None:
    page = context.new_page()
    page.goto(f"{server}/watch/{single_layer_stream}#token={VIEW_TOKEN}")
    hidden = {"hidden": True, "display": "none", "width": 0, "height": 0}
    # Before the page has asked for the layers: hidden by the HTML attribute alone.
    assert page.evaluate(PICKER_STATE) == hidden
    page.wait_for_selector("body[data-state=playing]", timeout=PAGE_TIMEOUT_MS)
    for _ in range(LAYER_READS):
        with page.expect_response(
            lambda response: response.url.endswith("/layer"), timeout=PAGE_TIMEOUT_MS
        ):
            pass
        # After each read of a one-layer stream the picker takes no room at all.
        assert page.evaluate(PICKER_STATE) == hidden
    assert page.locator("#layer-picker").bounding_box() is None
    assert not page.locator("#layer-picker").is_visible()


@pytest.mark.parametrize("path", ["/", "/watch/nobody#autoplay=0", "/publish/nobody"])
def test_every_page_has_an_icon_and_no_404(server: str, context: Any, path: str) -> None:
    page = context.new_page()
    responses: list[Any] = []
    page.on("response", lambda response: responses.append(response))
    page.goto(f"{server}{path}")
    page.wait_for_load_state("networkidle")
    missing = [(r.url, r.status) for r in responses if r.status == 404]
    assert missing == []
    # The tab's icon, when the browser loads it (it may keep one from an earlier page).
    loaded_icons = [(r.url, r.status) for r in responses if "favicon" in r.url]
    assert set(loaded_icons) <= {(f"{server}/static/favicon.svg", 200)}
    icon = page.evaluate("() => document.querySelector('link[rel=icon]').href")
    assert icon == f"{server}/static/favicon.svg"
    # What the browser fetches for the tab, whether it uses the link or the old path
    # (fetched from the page: the server is reachable only inside the namespace).
    linked = page.evaluate(FETCH_HEAD, icon)
    assert linked == {"status": 200, "type": "image/svg+xml", "head": list(b"<svg ")}
    # Playwright aborts and hides every request whose URL ends in /favicon.ico once a
    # context has routes (open_context serves the medooze client): ask with a query.
    conventional = page.evaluate(FETCH_HEAD, f"{server}/favicon.ico?from=test")
    # ICONDIR: reserved 0, type 1 (icon), then the image count.
    assert conventional == {
        "status": 200,
        "type": "image/vnd.microsoft.icon",
        "head": [0, 0, 1, 0, 3],
    }


def test_publish_page_turns_the_camera_off_after_a_409(
    server: str, context: Any, single_layer_stream: str
) -> None:
    page = context.new_page()
    page.add_init_script(script=RECORD_CAPTURES)
    page.goto(f"{server}/publish/{single_layer_stream}#token={PUBLISH_TOKEN}")
    with page.expect_response(
        lambda response: (
            response.url.endswith(f"/whip/{single_layer_stream}")
            and response.request.method == "POST"
        )
    ) as posted:
        page.click("#start")
    assert posted.value.status == 409  # the stream is live and takeover is off
    page.wait_for_selector("body[data-state=error]", timeout=PAGE_TIMEOUT_MS)
    released = page.evaluate(
        """() => ({
          states: window.__captured.flatMap((m) => m.getTracks().map((t) => t.readyState)),
          preview: document.getElementById("preview").srcObject,
        })"""
    )
    assert released == {"states": ["ended", "ended"], "preview": None}


# A second server in the namespace whose answers name an address nothing answers at
# (on the veth's subnet, no host): what a user sees when --udp/--public-ip are wrong.
UNREACHABLE_HTTP = "127.0.0.1:8091"
UNREACHABLE_UDP_PORT = 8191
UNREACHABLE_ADDRESS = "198.18.0.9"
# diagnosis.js CONNECT_HINT_MS, and the margin the page is given past it.
CONNECT_HINT_MS = 10_000


@pytest.fixture(scope="module")
def unreachable_server(
    namespace: NetworkNamespace, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    process = WhepfanProcess(
        namespace,
        [
            "serve",
            "--http",
            UNREACHABLE_HTTP,
            "--udp",
            f"0.0.0.0:{UNREACHABLE_UDP_PORT}",
            "--public-ip",
            UNREACHABLE_ADDRESS,
            "--publish-token",
            PUBLISH_TOKEN,
            "--worker-packet-budget",
            "none",
        ],
        Path(tmp_path_factory.mktemp("unreachable")) / "whepfan.log",
    )
    process.wait_for_output(r"WHEP on http://")
    yield f"http://{UNREACHABLE_HTTP}"
    process.stop()
    assert "Traceback" not in process.log(), process.log()[-4000:]


def test_a_publish_that_cannot_connect_says_what_it_tried(
    unreachable_server: str, context: Any
) -> None:
    page = context.new_page()
    page.goto(f"{unreachable_server}/publish/nowhere#token={PUBLISH_TOKEN}")
    page.click("#start")
    page.wait_for_function(
        "() => document.getElementById('status').textContent.startsWith('not connected after')",
        timeout=CONNECT_HINT_MS + PAGE_TIMEOUT_MS,
    )
    text = page.inner_text("#status")
    assert text.startswith("not connected after 10 s: ICE checking, DTLS new; ")
    where = f"{re.escape(UNREACHABLE_ADDRESS)}:{UNREACHABLE_UDP_PORT}"
    assert (
        f"server candidates from the answer: udp {UNREACHABLE_ADDRESS}:{UNREACHABLE_UDP_PORT} host"
        in text
    )
    assert re.search(r"our candidates: [^;]*udp 198\.18\.0\.1:\d+ host", text), text
    assert re.search(rf"checks: {where} [a-z-]+, [1-9]\d* checks sent, 0 answered", text), text
    # Still trying, not given up: the state says so and Stop still ends the session.
    assert page.evaluate("() => document.body.dataset.state") == "connecting"
    page.click("#stop")
    page.wait_for_selector("body[data-state=stopped]")
