"""The ``whepfan loadtest --html`` report as a person sees it: rendered from a recorded
run by today's code, opened in headless Chromium, every chart on screen with its axes,
ticks and something plotted, and a screenshot kept beside the test's files.

The recording (tests/data/loadtest/report.json) is a real run: ``whepfan serve
--metrics-token ...`` fed by ``whepfan publish --size 320x240 --bitrate 400k``, 24
viewers ramped at 8/s for 12 s with ``--server-metrics``, and four of the sessions
DELETEd out of band half-way, so that the stall charts and the server charts have
something to show. (Its live counterpart is
test_loadtest.py::test_viewers_whose_sessions_end_mid_run_are_reported_stalled.)

Needs no network namespace: the page is a local file with no scripts and no requests.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _harness import CHROMIUM, CHROMIUM_FLAGS, INSTALL_HINT

from whepfan.client.report import LoadTestReport, render_html

RECORDING = Path(__file__).resolve().parent.parent / "data" / "loadtest" / "report.json"
CHARTS = (
    "viewers",
    "bitrate",
    "packets",
    "loss",
    "keyframe",
    "viewer-loss",
    "viewer-gap",
    "server-cpu",
    "server-delay",
)

# Per chart: its box on the page, its tick labels, and the data artists drawn inside the
# axes (matplotlib clips exactly those to the axes, so clip-path marks them).
MEASURE_CHART = """figure => {
  const svg = figure.querySelector('svg');
  const box = svg.getBoundingClientRect();
  const labels = sel => [...svg.querySelectorAll(sel)].map(g => g.textContent.trim())
      .filter(Boolean);
  const plotted = [...svg.querySelectorAll('[clip-path]')].filter(e => {
      const b = e.getBBox(); return b.width > 0 || b.height > 0; }).length;
  const style = getComputedStyle(figure);
  return {width: box.width, height: box.height, left: box.left, right: box.right,
          xticks: labels('g[id*="xtick_"] text'), yticks: labels('g[id*="ytick_"] text'),
          axisLabels: [...svg.querySelectorAll('text')].map(t => t.textContent),
          plotted, visibility: style.visibility, display: style.display,
          pageWidth: document.documentElement.clientWidth};
}"""


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"Playwright for Python is missing; {INSTALL_HINT}", pytrace=False)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing; {INSTALL_HINT}", pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        yield browser
        browser.close()


def _report() -> LoadTestReport:
    return LoadTestReport(**json.loads(RECORDING.read_text()))


def _colours(png: bytes) -> int:
    """Distinct colours in a screenshot: a blank or single-colour box has one or two."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    return len(colours) if colours is not None else 1 << 16


def test_the_report_shows_every_chart_with_axes_ticks_and_data(
    chromium: Any, tmp_path: Path
) -> None:
    report = _report()
    page_file = tmp_path / "report.html"
    page_file.write_text(render_html(report), encoding="utf-8")
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto(page_file.as_uri())
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        assert page.locator("figure.chart").count() == len(CHARTS)
        for name in CHARTS:
            figure = page.locator(f"figure#chart-{name}")
            figure.scroll_into_view_if_needed()
            assert figure.is_visible(), name
            measured = figure.evaluate(MEASURE_CHART)
            # Laid out at a readable size, inside the page (not cut off at the right).
            assert measured["width"] > 400 and measured["height"] > 150, (name, measured)
            assert measured["left"] >= 0 and measured["right"] <= measured["pageWidth"], name
            assert measured["visibility"] == "visible" and measured["display"] != "none"
            assert len(measured["xticks"]) >= 2 and len(measured["yticks"]) >= 2, (name, measured)
            assert measured["plotted"] >= 1, (name, measured)
            shot = figure.screenshot(path=str(tmp_path / f"chart-{name}.png"))
            assert _colours(shot) > 20, name  # anti-aliased lines, text and fills
        # Units on the axes the charts are about.
        texts = {
            name: " ".join(
                page.locator(f"figure#chart-{name}").evaluate(MEASURE_CHART)["axisLabels"]
            )
            for name in CHARTS
        }
        assert "time since start (s)" in texts["viewers"]
        assert "(Mbit/s)" in texts["bitrate"] and "packets/s" in texts["packets"]
        assert "(%)" in texts["loss"] and "(ms)" in texts["keyframe"]
        assert "viewer #" in texts["viewer-loss"] and "stall gap 2 s" in texts["viewer-gap"]
        assert "% of one core" in texts["server-cpu"] and "(ms)" in texts["server-delay"]
        # The verdict says why the run failed, and the stalled viewers stand out.
        verdict = page.locator(".verdict.fail")
        assert verdict.is_visible() and "stalled" in verdict.inner_text()
        assert page.locator("tr.stalled").count() == report.summary["stalls"]["viewers"] > 0
        assert errors == []
        assert all(url.startswith("file://") for url in requests), requests
    finally:
        context.close()
