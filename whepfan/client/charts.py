"""The load-test report's charts: matplotlib figures rendered to SVG and inlined into the
HTML page (``report.render_html``), with axes, ticks and units.

Figures are built with ``matplotlib.figure.Figure`` directly, never pyplot: no backend
is selected, no display is opened and no global figure state is kept, so rendering is
safe in a headless process and in a library. Text stays text (``svg.fonttype: none``),
so the page is small and its labels searchable; each SVG's ids are prefixed with the
chart's name, since matplotlib numbers them per figure and one page holds many figures.

matplotlib comes with the ``load`` extra (``pip install 'whepfan[load]'``).
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from whepfan.client.report import LoadTestReport

BLUE, ORANGE, RED, GREY, GREEN = "#1565c0", "#ef6c00", "#c62828", "#757575", "#2e7d32"
_SIZE = (6.4, 3.0)  # inches; the page scales the SVG to its column
_STYLE: dict[Any, Any] = {
    "svg.fonttype": "none",
    "svg.hashsalt": "whepfan",  # stable clip-path ids: the same report, the same page
    "font.family": ["DejaVu Sans", "sans-serif"],
    "font.size": 9.0,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


class MatplotlibMissing(RuntimeError):
    """``--html`` without matplotlib installed."""


def require_matplotlib() -> None:
    """Raise :class:`MatplotlibMissing` unless the charts can be drawn (checked before a
    run, so that a missing extra is not found out only after it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MatplotlibMissing(
            "the HTML report needs matplotlib: pip install 'whepfan[load]'"
        ) from None


@dataclass(frozen=True, slots=True)
class Chart:
    name: str  # HTML id suffix: chart-<name>
    title: str
    svg: str


def report_charts(report: LoadTestReport) -> list[Chart]:
    """Every chart of the page, in page order; the server's only with its samples."""
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        return [
            Chart(name, title, _svg(draw(report), name)) for name, title, draw in _charts(report)
        ]


def _charts(
    report: LoadTestReport,
) -> Iterator[tuple[str, str, Callable[[LoadTestReport], Figure]]]:
    yield "viewers", "Viewers over time", _viewers_over_time
    yield "bitrate", "Delivered bitrate", _bitrate
    yield "packets", "Packets received per second", _packets
    yield "loss", "Loss over time", _loss_over_time
    yield "keyframe", "First-keyframe latency (from the POST)", _keyframe_latency
    yield "viewer-loss", "Loss per viewer", _loss_per_viewer
    yield "viewer-gap", "Longest gap in media per viewer", _gap_per_viewer
    if report.server_timeline:
        yield "server-cpu", "Server CPU against viewers", _server_cpu
        yield "server-delay", "Server receive delay against viewers", _server_delay


# --- rendering -------------------------------------------------------------------------

_ID = re.compile(r'\bid="([^"]+)"')
_REFERENCE = re.compile(r'(url\(#|href="#)([^")]+)')


def _svg(figure: Figure, prefix: str) -> str:
    """The figure as an ``<svg>`` element (no XML prolog) with ids unique to the page."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    text = _ID.sub(lambda m: f'id="{prefix}-{m[1]}"', text)
    return _REFERENCE.sub(lambda m: f"{m[1]}{prefix}-{m[2]}", text)


def _figure(*, right_axis: bool = False) -> tuple[Figure, Axes]:
    """A figure of ``_SIZE`` with fixed margins that fit the tick labels and axis titles
    of these charts (a layout engine finds the same margins for twice the drawing time:
    it lays every text out once more)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=_SIZE)
    figure.subplots_adjust(left=0.12, right=0.88 if right_axis else 0.97, bottom=0.16, top=0.95)
    return figure, figure.add_subplot()


def _no_data(axes: Axes, message: str) -> None:
    axes.text(0.5, 0.5, message, transform=axes.transAxes, ha="center", va="center", color=GREY)


def _time_axes(axes: Axes, y_label: str) -> None:
    axes.set_xlabel("time since start (s)")
    axes.set_ylabel(y_label)
    axes.set_xlim(left=0)
    axes.set_ylim(bottom=0)


def _column(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([row[key] for row in rows], dtype=float)


# --- the charts ------------------------------------------------------------------------


def _viewers_over_time(report: LoadTestReport) -> Figure:
    from matplotlib.ticker import MaxNLocator

    figure, axes = _figure()
    timeline = report.timeline
    if timeline:
        time = _column(timeline, "time")
        series = (
            ("started", "started", GREY, "--"),
            ("connected", "connected", BLUE, "-"),
            ("stalled", "stalled now", ORANGE, "-"),
            ("failed", "failed", RED, "-"),
            ("rejected", "refused", RED, ":"),
        )
        for key, label, color, style in series:
            axes.step(
                time, _column(timeline, key), where="post", label=label, color=color,
                linestyle=style,
            )  # fmt: skip
        axes.legend(loc="best", fontsize=8)
    else:
        _no_data(axes, "no samples")
    _time_axes(axes, "viewers")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def _rate_over_time(report: LoadTestReport, key: str, y_label: str, color: str) -> Figure:
    figure, axes = _figure()
    timeline = report.timeline
    if timeline:
        time, values = _column(timeline, "time"), _column(timeline, key)
        axes.plot(time, values, color=color, marker="o", markersize=2.5)
        axes.fill_between(time, values, color=color, alpha=0.12)
    else:
        _no_data(axes, "no samples")
    _time_axes(axes, y_label)
    return figure


def _bitrate(report: LoadTestReport) -> Figure:
    return _rate_over_time(report, "mbps", "delivered, all viewers (Mbit/s)", BLUE)


def _packets(report: LoadTestReport) -> Figure:
    return _rate_over_time(report, "packets_per_second", "RTP packets/s, all viewers", GREEN)


def _loss_over_time(report: LoadTestReport) -> Figure:
    figure = _rate_over_time(report, "loss_percent", "loss in each interval (%)", RED)
    axes = figure.axes[0]
    if report.timeline and not _column(report.timeline, "loss_percent").any():
        axes.set_ylim(0, 1)  # no loss: a readable flat line at 0, not a degenerate axis
    return figure


def _keyframe_latency(report: LoadTestReport) -> Figure:
    figure, axes = _figure(right_axis=True)
    values = np.array(
        [v["first_keyframe"] * 1000 for v in report.viewers if v["first_keyframe"] is not None]
    )
    axes.set_xlabel("POST to first keyframe (ms)")
    axes.set_ylabel("viewers")
    if not values.size:
        _no_data(axes, "no viewer received a keyframe")
        return figure
    axes.hist(values, bins=min(30, max(5, values.size // 3)), color=BLUE, alpha=0.75)
    cdf = axes.twinx()
    ordered = np.sort(values)
    fractions = np.arange(1, ordered.size + 1) / ordered.size
    cdf.step(ordered, fractions * 100, where="post", color=ORANGE, label="CDF")
    cdf.set_ylim(0, 100)
    cdf.set_ylabel("viewers with a keyframe by then (%)")
    cdf.grid(False)
    cdf.spines["right"].set_visible(True)
    p95 = ordered[max(0, int(np.ceil(0.95 * ordered.size)) - 1)]
    cdf.axvline(p95, color=GREY, linestyle=":", linewidth=1)
    cdf.annotate(
        f"p95 {p95:.0f} ms", (p95, 50), xytext=(4, 0), textcoords="offset points", fontsize=8,
        color=GREY,
    )  # fmt: skip
    axes.set_xlim(left=0)
    return figure


def _per_viewer_axes(axes: Axes, count: int, y_label: str) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.set_xlabel("viewer #")
    axes.set_ylabel(y_label)
    axes.set_xlim(-0.5, max(count, 1) - 0.5)
    axes.set_ylim(bottom=0)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _loss_per_viewer(report: LoadTestReport) -> Figure:
    figure, axes = _figure()
    viewers = report.viewers
    loss = np.array(
        [
            100.0 * v["counters"]["lost"] / v["counters"]["expected"]
            if v["counters"].get("expected")
            else 0.0
            for v in viewers
        ]
    )
    if viewers:
        # One step outline for all viewers: one SVG path, however many viewers there are.
        axes.stairs(loss, np.arange(len(viewers) + 1) - 0.5, fill=True, color=RED, alpha=0.8)
        if not loss.any():
            axes.set_ylim(0, 1)
            _no_data(axes, "no viewer lost a packet")
    else:
        _no_data(axes, "no viewers")
    _per_viewer_axes(axes, len(viewers), "loss (%)")
    return figure


def _gap_per_viewer(report: LoadTestReport) -> Figure:
    figure, axes = _figure()
    viewers = report.viewers
    gap = float(report.summary["stalls"]["gap_seconds"])
    longest = np.array([v["longest_gap"] for v in viewers], dtype=float)
    stalled = np.array([bool(v["stalls"]) for v in viewers], dtype=bool)
    if viewers:
        edges = np.arange(len(viewers) + 1) - 0.5
        axes.stairs(np.where(stalled, 0.0, longest), edges, fill=True, color=BLUE, label="ok")
        if stalled.any():
            axes.stairs(
                np.where(stalled, longest, 0.0), edges, fill=True, color=ORANGE, label="stalled"
            )
        axes.axhline(gap, color=RED, linestyle="--", linewidth=1, label=f"stall gap {gap:g} s")
        axes.legend(loc="best", fontsize=8)
    else:
        _no_data(axes, "no viewers")
    _per_viewer_axes(axes, len(viewers), "longest silence (s)")
    axes.set_ylim(top=max(gap * 1.5, float(longest.max()) * 1.1 if longest.size else 0.0))
    return figure


def _against_viewers(
    report: LoadTestReport, values: Callable[[dict[str, Any]], float | None], y_label: str
) -> Figure:
    figure, axes = _figure()
    points = [
        (row["viewers"], value)
        for row in report.server_timeline
        if (value := values(row)) is not None
    ]
    if points:
        x, y = np.array(points, dtype=float).T
        # In time order: the ramp up, the plateau and the way down are one path.
        axes.plot(x, y, color=GREY, linewidth=0.8, alpha=0.6)
        axes.scatter(x, y, s=10, color=BLUE, zorder=3)
    else:
        _no_data(axes, "the server exports no such metric")
    axes.set_xlabel("viewers connected (this load test)")
    axes.set_ylabel(y_label)
    axes.set_xlim(left=0)
    axes.set_ylim(bottom=0)
    return figure


def _server_cpu(report: LoadTestReport) -> Figure:
    return _against_viewers(
        report,
        lambda row: row["cpu_percent"],
        "server CPU (% of one core)",
    )


def _server_delay(report: LoadTestReport) -> Figure:
    return _against_viewers(
        report,
        lambda row: None if row["receive_delay"] is None else row["receive_delay"] * 1000,
        "worst worker receive delay (ms)",
    )
