"""Load-test results: the summary (percentiles, loss distribution, stalls, answers, the
verdict), and its renderings: a text table for the terminal, JSON, and a self-contained
HTML page whose charts are matplotlib SVG inlined into it (``charts.py``; no scripts, no
network)."""

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
    """The run's state at ``time`` seconds; packet, byte and loss counts are cumulative."""

    time: float
    started: int
    connected: int
    failed: int
    rejected: int
    bytes: int
    lost: int
    expected: int
    cpu: float = 0.0  # the harness's own CPU seconds (user + system) since the start
    packets: int = 0
    stalled: int = 0  # viewers silent for longer than the stall gap at this moment


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSample:
    """One scrape of the server's ``/metrics`` at ``time`` seconds into the run, with the
    number of our viewers connected then. None where the server exports no such metric."""

    time: float
    viewers: int  # ours, connected at the scrape
    cpu_seconds: float | None = None  # sum of process_cpu_seconds_total
    receive_delay: float | None = None  # max of whepfan_worker_receive_delay_seconds
    server_viewers: float | None = None  # sum of whepfan_viewers


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
    # The server's /metrics over the run (``--server-metrics``), with rates worked out.
    server_timeline: list[dict[str, Any]] = field(default_factory=list)

    @property
    def all_viewers_received_media(self) -> bool:
        return bool(self.viewers) and all(
            v["outcome"] == "connected" and v["first_rtp"] is not None for v in self.viewers
        )

    @property
    def problems(self) -> list[str]:
        """What makes the run a failure, one sentence each; empty when it passed."""
        return list(self.summary.get("problems", []))

    @property
    def passed(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return orjson.dumps(self.as_dict(), option=orjson.OPT_INDENT_2).decode()


def _loss_percent(counters: dict[str, Any]) -> float | None:
    expected = counters.get("expected")
    return 100.0 * counters["lost"] / expected if expected else None


def _problems(summary: dict[str, Any]) -> list[str]:
    problems = []
    viewers = summary["viewers"]
    if summary["stopped_early"]:
        problems.append(summary["stopped_early"])
    else:
        counts = (
            (summary["failed"], "failed"),
            (summary["rejected"], "refused"),
            (summary["connected_without_media"], "connected but got no media"),
        )
        problems += [f"{n} of {viewers} viewers {what}" for n, what in counts if n]
        if not viewers:
            problems.append("no viewer was started")
    stalls = summary["stalls"]
    if stalls["viewers"]:
        problems.append(
            f"{stalls['viewers']} of {viewers} viewers stalled (no media for over "
            f"{stalls['gap_seconds']:g} s; {stalls['stalled_at_end']} until the end)"
        )
    return problems


def summarize(
    *,
    url: str,
    options: dict[str, Any],
    viewers: Sequence[ViewerResult],
    samples: Sequence[Sample],
    wall_seconds: float,
    cpu_seconds: float,
    server_samples: Sequence[ServerSample] = (),
    stall_gap: float = 2.0,
    measured_until: float | None = None,
    stopped_early: str = "",
    server_metrics_errors: dict[str, int] | None = None,
) -> LoadTestReport:
    """``measured_until``: seconds since the start of the run's last stall check (the end
    of every open gap); ``stopped_early``: why the run ended before its duration."""
    outcomes = Counter(v.outcome for v in viewers)
    statuses = Counter(str(v.status) if v.status is not None else "no answer" for v in viewers)
    latencies = {}
    for name, _ in LATENCIES:
        measured = [getattr(v, name) for v in viewers]
        latencies[name] = _distribution([value * 1000 for value in measured if value is not None])
    loss_percent = [p for v in viewers if (p := _loss_percent(v.counters)) is not None]
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
    stalled = [v for v in viewers if v.stalls]
    summary: dict[str, Any] = {
        "viewers": len(viewers),
        "connected": outcomes.get("connected", 0),
        "received_media": sum(1 for v in viewers if v.first_rtp is not None),
        "connected_without_media": sum(
            1 for v in viewers if v.outcome == "connected" and v.first_rtp is None
        ),
        "failed": outcomes.get("failed", 0),
        "rejected": outcomes.get("rejected", 0),
        "answers": dict(sorted(statuses.items())),
        # Where the viewers were answered: a cluster places them by 307 (RFC 9725 §4.5).
        "endpoints": dict(sorted(Counter(v.endpoint for v in viewers if v.endpoint).items())),
        "redirected": sum(1 for v in viewers if v.redirects),
        "errors": dict(Counter(v.error for v in viewers if v.error).most_common(10)),
        "latency_ms": latencies,
        "loss_percent": {
            **_distribution(loss_percent),
            "viewers_without_loss": sum(1 for p in loss_percent if p == 0),
        },
        "stalls": {
            "gap_seconds": stall_gap,
            "viewers": len(stalled),
            "stalls": sum(v.stalls for v in viewers),
            "stalled_at_end": sum(1 for v in viewers if v.stalled_at_end),
            "longest_gap_seconds": max((v.longest_gap for v in viewers), default=0.0),
        },
        "jitter_ms": _distribution(jitter),
        "bitrate_kbps": _distribution([b / 1000 for b in bitrates]),
        "totals": dict(total),
        "harness_cpu_percent": 100.0 * cpu_seconds / wall_seconds if wall_seconds else 0.0,
        "measured_until": measured_until,
        "stopped_early": stopped_early,
        "server_metrics_errors": dict(server_metrics_errors or {}),
    }
    summary["problems"] = _problems(summary)
    return LoadTestReport(
        url=url,
        options=options,
        wall_seconds=wall_seconds,
        cpu_seconds=cpu_seconds,
        summary=summary,
        viewers=[v.as_dict() for v in viewers],
        timeline=_timeline(samples),
        server_timeline=_server_timeline(server_samples),
    )


def _timeline(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """Each sample with the rates over the interval that ended at it."""
    timeline = []
    previous: Sample | None = None
    for sample in samples:
        interval = sample.time - (previous.time if previous else 0.0)
        delivered = sample.bytes - (previous.bytes if previous else 0)
        packets = sample.packets - (previous.packets if previous else 0)
        lost = sample.lost - (previous.lost if previous else 0)
        expected = sample.expected - (previous.expected if previous else 0)
        spent = sample.cpu - (previous.cpu if previous else 0.0)
        timeline.append(
            {
                **asdict(sample),
                "mbps": delivered * 8 / interval / 1e6 if interval > 0 else 0.0,
                "packets_per_second": packets / interval if interval > 0 else 0.0,
                "loss_percent": 100.0 * lost / expected if expected > 0 else 0.0,
                "cpu_percent": 100.0 * spent / interval if interval > 0 else 0.0,
            }
        )
        previous = sample
    return timeline


def _server_timeline(samples: Sequence[ServerSample]) -> list[dict[str, Any]]:
    """Each scrape, with the server's CPU use over the interval since the one before (a
    counter is only meaningful as a rate; the first scrape has none, nor does one after
    a reset, which a restarted worker causes)."""
    timeline = []
    previous: ServerSample | None = None
    for sample in samples:
        cpu_percent = None
        if (
            previous is not None
            and sample.cpu_seconds is not None
            and previous.cpu_seconds is not None
            and sample.time > previous.time
            and sample.cpu_seconds >= previous.cpu_seconds
        ):
            cpu_percent = (
                100.0 * (sample.cpu_seconds - previous.cpu_seconds) / (sample.time - previous.time)
            )
        timeline.append({**asdict(sample), "cpu_percent": cpu_percent})
        previous = sample
    return timeline


def _number(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_text(report: LoadTestReport) -> str:
    summary = report.summary
    stalls = summary["stalls"]
    lines = [
        f"whepfan loadtest {report.url}",
        f"viewers {summary['viewers']}: {summary['connected']} connected, "
        f"{summary['received_media']} received media, {summary['failed']} failed, "
        f"{summary['rejected']} rejected, {stalls['viewers']} stalled",
        "answers: " + ", ".join(f"{code} x{count}" for code, count in summary["answers"].items()),
    ]
    if summary.get("redirected"):
        lines.append(
            f"redirected {summary['redirected']} of {summary['viewers']}; answered by "
            + ", ".join(f"{url} x{count}" for url, count in summary["endpoints"].items())
        )
    if summary["stopped_early"]:
        lines.append(f"stopped early: {summary['stopped_early']}")
    lines += [
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
        f"stalls (no media for over {stalls['gap_seconds']:g} s): {stalls['stalls']} in "
        f"{stalls['viewers']} viewers, {stalls['stalled_at_end']} still stalled at the end; "
        f"longest gap {stalls['longest_gap_seconds']:.1f} s",
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
    stalled = [v for v in report.viewers if v["stalls"]]
    if stalled:
        shown = ", ".join(
            f"#{v['index']} {v['longest_gap']:.1f} s"
            + (" (to the end)" if v["stalled_at_end"] else "")
            for v in sorted(stalled, key=lambda v: -v["longest_gap"])[:10]
        )
        more = f" and {len(stalled) - 10} more" if len(stalled) > 10 else ""
        lines.append(f"stalled viewers, longest gap: {shown}{more}")
    if report.server_timeline:
        lines.append(_server_line(report))
    if summary["server_metrics_errors"]:
        lines.append(
            "server metrics: "
            + "; ".join(f"{e} x{n}" for e, n in summary["server_metrics_errors"].items())
        )
    if summary["errors"]:
        lines.append("errors: " + "; ".join(f"{e} x{n}" for e, n in summary["errors"].items()))
    problems = report.problems
    lines.append("verdict: " + ("PASS" if not problems else "FAIL: " + "; ".join(problems)))
    return "\n".join(lines)


def _server_line(report: LoadTestReport) -> str:
    cpu = [s["cpu_percent"] for s in report.server_timeline if s["cpu_percent"] is not None]
    delay = [s["receive_delay"] for s in report.server_timeline if s["receive_delay"] is not None]
    parts = [f"server /metrics: {len(report.server_timeline)} scrapes"]
    if cpu:
        parts.append(f"CPU p50 {percentile(cpu, 0.5):.0f}% max {max(cpu):.0f}% of one core")
    if delay:
        parts.append(f"receive delay max {max(delay) * 1000:.1f} ms")
    return ", ".join(parts)


# --- HTML ------------------------------------------------------------------------------

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
pre { background: #f5f5f5; padding: 1em; overflow-x: auto; font-size: 12px; }
.verdict { padding: 0.6em 1em; border-radius: 4px; font-weight: 600; }
.verdict.pass { background: #e6f4ea; color: #1e6b34; }
.verdict.fail { background: #fce8e6; color: #a50e0e; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr));
          gap: 1.5em; }
figure.chart { margin: 0; }
figure.chart figcaption { font-weight: 600; margin-bottom: 0.3em; }
figure.chart svg { width: 100%; height: auto; display: block; }
table { border-collapse: collapse; font-size: 12px; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
tr.stalled td { background: #fff4e5; } tr.failed td { background: #fce8e6; }
"""


def _viewer_row(viewer: dict[str, Any]) -> str:
    counters = viewer["counters"]
    loss = _loss_percent(counters) if counters else None
    values = (
        viewer["index"],
        viewer["outcome"],
        viewer["status"],
        *(None if viewer[name] is None else viewer[name] * 1000 for name, _ in LATENCIES),
        counters.get("packets"),
        counters.get("lost"),
        None if loss is None else f"{loss:.3f}",
        counters.get("decrypt_failures"),
        viewer["bitrate"] / 1000,
        viewer["stalls"],
        viewer["longest_gap"],
        viewer["error"] or "",
    )
    cells = "".join(
        f"<td>{html.escape(_number(value, 1) if isinstance(value, float) else str(value))}</td>"
        for value in values
    )
    row_class = (
        "stalled" if viewer["stalls"] else "failed" if viewer["outcome"] != "connected" else ""
    )
    return f'<tr class="{row_class}">{cells}</tr>'


def render_html(report: LoadTestReport) -> str:
    """The page: verdict, the text summary, the charts, one table row per viewer.
    Needs matplotlib (the ``load`` extra)."""
    from whepfan.client import charts

    headers = "".join(
        f"<th>{html.escape(h)}</th>"
        for h in (
            "#",
            "outcome",
            "HTTP",
            *(label + " ms" for _, label in LATENCIES),
            "packets",
            "lost",
            "loss %",
            "decrypt failures",
            "kbit/s",
            "stalls",
            "longest gap s",
            "error",
        )
    )
    rows = "".join(_viewer_row(v) for v in report.viewers)
    problems = report.problems
    verdict = (
        '<p class="verdict pass">PASS</p>'
        if not problems
        else '<p class="verdict fail">FAIL: ' + html.escape("; ".join(problems)) + "</p>"
    )
    figures = "\n".join(
        f'<figure class="chart" id="chart-{chart.name}"><figcaption>'
        f"{html.escape(chart.title)}</figcaption>{chart.svg}</figure>"
        for chart in charts.report_charts(report)
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>whepfan loadtest report</title>
<style>{_STYLE}</style></head><body>
<h1>whepfan loadtest</h1>
{verdict}
<pre>{html.escape(render_text(report))}</pre>
<section class="charts">
{figures}
</section>
<h2>Viewers</h2>
<table><tr>{headers}</tr>{rows}</table>
</body></html>
"""
