"""Load-test results: the summary (percentiles, loss distribution, answers), and its
renderings: a text table for the terminal, JSON, and a self-contained HTML page with
inline SVG plots (no scripts, no network)."""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from whepfan.client.loadtest import ViewerResult

LATENCIES = (
    ("answered", "POST -> 201"),
    ("ice_connected", "-> ICE connected"),
    ("dtls_connected", "-> DTLS done"),
    ("first_rtp", "-> first RTP"),
    ("first_keyframe", "-> first keyframe"),
)


@dataclass(frozen=True, slots=True)
class Sample:
    """The run's state at ``time`` seconds; byte and loss counts are cumulative."""

    time: float
    started: int
    connected: int
    failed: int
    rejected: int
    bytes: int
    lost: int
    expected: int
    cpu: float = 0.0  # the harness's own CPU seconds (user + system) since the start


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile (``fraction`` in 0..1) of ``values``; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def _distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    return {
        "count": len(values),
        "p50": percentile(values, 0.50),
        "p95": percentile(values, 0.95),
        "p99": percentile(values, 0.99),
        "max": max(values) if values else None,
    }


@dataclass
class LoadTestReport:
    url: str
    options: dict[str, Any]
    wall_seconds: float
    cpu_seconds: float
    summary: dict[str, Any]
    viewers: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)

    @property
    def all_viewers_received_media(self) -> bool:
        return bool(self.viewers) and all(
            v["outcome"] == "connected" and v["first_rtp"] is not None for v in self.viewers
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return orjson.dumps(self.as_dict(), option=orjson.OPT_INDENT_2).decode()


def summarize(
    *,
    url: str,
    options: dict[str, Any],
    viewers: Sequence[ViewerResult],
    samples: Sequence[Sample],
    wall_seconds: float,
    cpu_seconds: float,
) -> LoadTestReport:
    outcomes = Counter(v.outcome for v in viewers)
    statuses = Counter(str(v.status) if v.status is not None else "no answer" for v in viewers)
    latencies = {}
    for name, _ in LATENCIES:
        measured = [getattr(v, name) for v in viewers]
        latencies[name] = _distribution([value * 1000 for value in measured if value is not None])
    loss_percent = [
        100.0 * v.counters["lost"] / v.counters["expected"]
        for v in viewers
        if v.counters.get("expected")
    ]
    total = Counter[str]()
    for viewer in viewers:
        for key in (
            "packets",
            "bytes",
            "lost",
            "expected",
            "duplicates",
            "decrypted",
            "decrypt_failures",
            "replayed",
            "rtcp_packets",
            "socket_drops",
        ):
            total[key] += int(viewer.counters.get(key) or 0)
    bitrates = [v.bitrate for v in viewers if v.bitrate]
    jitter = [
        max(v.counters.get("audio_jitter_ms") or 0.0, v.counters.get("video_jitter_ms") or 0.0)
        for v in viewers
        if v.counters.get("packets")
    ]
    summary = {
        "viewers": len(viewers),
        "connected": outcomes.get("connected", 0),
        "received_media": sum(1 for v in viewers if v.first_rtp is not None),
        "failed": outcomes.get("failed", 0),
        "rejected": outcomes.get("rejected", 0),
        "answers": dict(sorted(statuses.items())),
        "errors": dict(Counter(v.error for v in viewers if v.error).most_common(10)),
        "latency_ms": latencies,
        "loss_percent": {
            **_distribution(loss_percent),
            "viewers_without_loss": sum(1 for p in loss_percent if p == 0),
        },
        "jitter_ms": _distribution(jitter),
        "bitrate_kbps": _distribution([b / 1000 for b in bitrates]),
        "totals": dict(total),
        "harness_cpu_percent": 100.0 * cpu_seconds / wall_seconds if wall_seconds else 0.0,
    }
    timeline = []
    previous: Sample | None = None
    for sample in samples:
        interval = sample.time - (previous.time if previous else 0.0)
        delivered = sample.bytes - (previous.bytes if previous else 0)
        spent = sample.cpu - (previous.cpu if previous else 0.0)
        timeline.append(
            {
                **asdict(sample),
                "mbps": delivered * 8 / interval / 1e6 if interval > 0 else 0.0,
                "cpu_percent": 100.0 * spent / interval if interval > 0 else 0.0,
            }
        )
        previous = sample
    return LoadTestReport(
        url=url,
        options=options,
        wall_seconds=wall_seconds,
        cpu_seconds=cpu_seconds,
        summary=summary,
        viewers=[v.as_dict() for v in viewers],
        timeline=timeline,
    )


def _number(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_text(report: LoadTestReport) -> str:
    summary = report.summary
    lines = [
        f"whepfan loadtest {report.url}",
        f"viewers {summary['viewers']}: {summary['connected']} connected, "
        f"{summary['received_media']} received media, {summary['failed']} failed, "
        f"{summary['rejected']} rejected",
        "answers: " + ", ".join(f"{code} x{count}" for code, count in summary["answers"].items()),
        "",
        f"{'latency (ms)':<20}{'n':>6}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}",
    ]
    for name, label in LATENCIES:
        row = summary["latency_ms"][name]
        lines.append(
            f"{label:<20}{row['count']:>6}"
            + "".join(f"{_number(row[key]):>10}" for key in ("p50", "p95", "p99", "max"))
        )
    loss = summary["loss_percent"]
    totals = summary["totals"]
    lines += [
        "",
        f"loss %: p50 {_number(loss['p50'], 3)}  p95 {_number(loss['p95'], 3)}  "
        f"p99 {_number(loss['p99'], 3)}  max {_number(loss['max'], 3)}  "
        f"({loss['viewers_without_loss']}/{loss['count']} viewers without loss)",
        f"jitter ms: p50 {_number(summary['jitter_ms']['p50'])}  "
        f"p95 {_number(summary['jitter_ms']['p95'])}  max {_number(summary['jitter_ms']['max'])}",
        f"bitrate kbit/s per viewer: p50 {_number(summary['bitrate_kbps']['p50'])}  "
        f"min..max over viewers in the JSON report",
        f"packets {totals.get('packets', 0)}, lost {totals.get('lost', 0)}, duplicates "
        f"{totals.get('duplicates', 0)}, decrypted {totals.get('decrypted', 0)}, decrypt "
        f"failures {totals.get('decrypt_failures', 0)}; dropped by the load generator's own "
        f"full socket buffers (counted in lost too): {totals.get('socket_drops', 0)}",
        f"harness: {report.wall_seconds:.1f} s wall, {report.cpu_seconds:.1f} s CPU "
        f"({summary['harness_cpu_percent']:.0f}% of one core)",
    ]
    if summary["errors"]:
        lines.append("errors: " + "; ".join(f"{e} x{n}" for e, n in summary["errors"].items()))
    return "\n".join(lines)


# --- HTML ------------------------------------------------------------------------------

_WIDTH, _HEIGHT, _MARGIN = 640, 220, 44


def _svg_line(points: Sequence[tuple[float, float]], title: str, y_label: str) -> str:
    if not points:
        return f"<p>{html.escape(title)}: no samples</p>"
    max_x = max(x for x, _ in points) or 1.0
    max_y = max(y for _, y in points) or 1.0
    plot_w, plot_h = _WIDTH - 2 * _MARGIN, _HEIGHT - 2 * _MARGIN

    def scale(x: float, y: float) -> str:
        return f"{_MARGIN + x / max_x * plot_w:.1f},{_HEIGHT - _MARGIN - y / max_y * plot_h:.1f}"

    path = " ".join(scale(x, y) for x, y in points)
    return (
        f"<figure><figcaption>{html.escape(title)}</figcaption>"
        f'<svg viewBox="0 0 {_WIDTH} {_HEIGHT}" width="{_WIDTH}" height="{_HEIGHT}">'
        f'<rect x="{_MARGIN}" y="{_MARGIN}" width="{plot_w}" height="{plot_h}" class="frame"/>'
        f'<polyline points="{path}" class="line"/>'
        f'<text x="{_MARGIN}" y="{_MARGIN - 8}">{html.escape(y_label)} (max {max_y:.1f})</text>'
        f'<text x="{_WIDTH - _MARGIN}" y="{_HEIGHT - 12}" text-anchor="end">'
        f"time (s, max {max_x:.1f})</text></svg></figure>"
    )


def _svg_histogram(values: Sequence[float], title: str, bins: int = 20) -> str:
    if not values:
        return f"<p>{html.escape(title)}: no values</p>"
    low, high = min(values), max(values)
    width = (high - low) / bins or 1.0
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, int((value - low) / width))] += 1
    plot_w, plot_h = _WIDTH - 2 * _MARGIN, _HEIGHT - 2 * _MARGIN
    tallest = max(counts)
    bars = []
    for index, count in enumerate(counts):
        bar_h = count / tallest * plot_h
        bars.append(
            f'<rect class="bar" x="{_MARGIN + index * plot_w / bins:.1f}" '
            f'y="{_HEIGHT - _MARGIN - bar_h:.1f}" width="{plot_w / bins - 1:.1f}" '
            f'height="{bar_h:.1f}"><title>{low + index * width:.0f}-'
            f"{low + (index + 1) * width:.0f} ms: {count}</title></rect>"
        )
    return (
        f"<figure><figcaption>{html.escape(title)}</figcaption>"
        f'<svg viewBox="0 0 {_WIDTH} {_HEIGHT}" width="{_WIDTH}" height="{_HEIGHT}">'
        + "".join(bars)
        + f'<text x="{_MARGIN}" y="{_HEIGHT - 12}">{low:.0f} ms</text>'
        f'<text x="{_WIDTH - _MARGIN}" y="{_HEIGHT - 12}" text-anchor="end">{high:.0f} ms</text>'
        f'<text x="{_MARGIN}" y="{_MARGIN - 8}">viewers (max {tallest})</text></svg></figure>'
    )


def render_html(report: LoadTestReport) -> str:
    timeline = report.timeline
    join = [v["first_rtp"] * 1000 for v in report.viewers if v["first_rtp"] is not None]
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(_number(value, 1) if isinstance(value, float) else str(value))}</td>"
            for value in (
                v["index"],
                v["outcome"],
                v["status"],
                *(None if v[name] is None else v[name] * 1000 for name, _ in LATENCIES),
                v["counters"].get("packets"),
                v["counters"].get("lost"),
                v["counters"].get("decrypt_failures"),
                v["bitrate"] / 1000,
                v["error"] or "",
            )
        )
        + "</tr>"
        for v in report.viewers
    )
    headers = "".join(
        f"<th>{html.escape(h)}</th>"
        for h in (
            "#",
            "outcome",
            "HTTP",
            *(label + " ms" for _, label in LATENCIES),
            "packets",
            "lost",
            "decrypt failures",
            "kbit/s",
            "error",
        )
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>whepfan loadtest report</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}
pre {{ background: #f5f5f5; padding: 1em; overflow-x: auto; }}
svg text {{ font-size: 11px; fill: #444; }}
.frame {{ fill: none; stroke: #bbb; }} .line {{ fill: none; stroke: #1565c0; stroke-width: 2; }}
.bar {{ fill: #1565c0; }} table {{ border-collapse: collapse; font-size: 12px; }}
td, th {{ border: 1px solid #ddd; padding: 2px 6px; text-align: right; }}
</style></head><body>
<h1>whepfan loadtest</h1>
<pre>{html.escape(render_text(report))}</pre>
{_svg_line([(s["time"], s["connected"]) for s in timeline], "Connected viewers", "viewers")}
{_svg_line([(s["time"], s["mbps"]) for s in timeline], "Delivered bitrate", "Mbit/s")}
{_svg_histogram(join, "Join latency: POST to first RTP")}
<h2>Viewers</h2>
<table><tr>{headers}</tr>{rows}</table>
</body></html>
"""
