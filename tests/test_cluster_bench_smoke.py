"""bench/cascade.py --smoke as a user runs it (origin -> edge A -> edge B as whepfan serve
processes): every figure it reports is there and measured; no timing thresholds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

BENCHMARK = Path(__file__).resolve().parent.parent / "bench" / "cascade.py"


def test_cascade_smoke_reports_hops_cpu_and_cold_edge(tmp_path: Path) -> None:
    report_path = tmp_path / "cascade.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--smoke", "--json", str(report_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = orjson.loads(report_path.read_bytes())
    for name in ("origin->edge A", "edge A->edge B"):
        hop = report["hops"][name]
        assert hop["packets"] > 0
        assert hop["p50_ms"] <= hop["p99_ms"] <= hop["max_ms"]
    # Read off the process's CPU-time clock (bench/_cpu.py, ns resolution): an edge with one
    # pull and one viewer shows its share even in the smoke's short window.
    assert report["cpu"]["edge_one_viewer_cpu_per_s"] > 0
    cold = report["cold_edge_post_to_keyframe_ms"]
    assert cold["rounds"] == 1 and cold["p50"] > 0
    assert "cold edge POST -> first keyframe" in result.stdout
