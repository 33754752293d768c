"""bench/fanout.py --smoke, run as a user runs it: a subprocess that must print the table
with sane, positive figures and write the same figures as JSON. No timing thresholds:
the figures depend on the machine and on whatever else runs on it."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
BENCHMARK = REPOSITORY / "bench" / "fanout.py"
SMOKE_VIEWERS = (10, 100)
PROFILES = ("GCM", "CM")
# One table row: viewers, profile, then ten numbers (see bench/README.md).
ROW = re.compile(r"^\s*(\d+)\s+(GCM|CM)((?:\s+[-+]?\d+(?:\.\d+)?){10})\s*$")
TIMEOUT = 300  # a generous ceiling for a shared CI machine, not a performance threshold


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    json_path = tmp_path_factory.mktemp("bench") / "fanout.json"
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    completed = subprocess.run(
        [sys.executable, str(BENCHMARK), "--smoke", "--quiet", "--json", str(json_path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=environment,
        cwd=REPOSITORY,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout, json.loads(json_path.read_text())


def table_rows(output: str) -> dict[tuple[int, str], list[float]]:
    rows = {}
    for line in output.splitlines():
        match = ROW.match(line)
        if match:
            numbers = [float(value) for value in match.group(3).split()]
            rows[int(match.group(1)), match.group(2)] = numbers
    return rows


def test_table_has_every_viewer_count_and_profile(smoke: tuple[str, dict[str, Any]]) -> None:
    output, _ = smoke
    assert "fan-out k/CPU-s" in output and "limit k/CPU-s" in output
    rows = table_rows(output)
    assert sorted(rows) == sorted((n, p) for n in SMOKE_VIEWERS for p in PROFILES)


def test_table_figures_are_sane(smoke: tuple[str, dict[str, Any]]) -> None:
    output, _ = smoke
    for (viewers, profile), numbers in table_rows(output).items():
        (
            fanout_rate,
            limit_rate,
            limit_ratio,
            baseline_rate,
            baseline_ratio,
            delivered_percent,
            wall_rate,
            kib_per_viewer,
            p50,
            p99,
        ) = numbers
        label = f"{viewers} viewers, {profile}"
        for name, value in [
            ("fan-out rate", fanout_rate),
            ("limit rate", limit_rate),
            ("limit ratio", limit_ratio),
            ("baseline rate", baseline_rate),
            ("baseline ratio", baseline_ratio),
            ("wall rate", wall_rate),
            ("p50", p50),
        ]:
            assert value > 0, f"{label}: {name} is {value}"
        # Loopback with buffers sized per round: some loss would be reported, not hidden.
        assert 0 < delivered_percent <= 100, label
        assert kib_per_viewer >= 0, label
        assert p99 >= p50, label
        # The printed ratio is the ratio of the printed rates (per run, then the median;
        # with the smoke's single run the two agree up to rounding).
        assert limit_ratio == pytest.approx(fanout_rate / limit_rate, rel=0.05, abs=0.01)
        assert baseline_ratio == pytest.approx(fanout_rate / baseline_rate, rel=0.05, abs=0.1)


def test_json_matches_table(smoke: tuple[str, dict[str, Any]]) -> None:
    output, report = smoke
    table = table_rows(output)
    rows = report["rows"]
    assert len(rows) == len(table)
    for row in rows:
        numbers = table[row["viewers"], row["profile"]]
        assert row["fanout_rate"] / 1000 == pytest.approx(numbers[0], abs=0.06)
        assert row["limit_ratio"] == pytest.approx(numbers[2], abs=0.006)
        assert row["sockets"] == row["viewers"]  # one socket per viewer at these counts
        assert len(row["runs"]) == 1
        for run in row["runs"]:
            for contender in ("fanout", "limit", "baseline"):
                assert 0 < run[f"{contender}_delivered"] <= 1
            assert run["pushes"] >= 100
        memory = row["memory"]
        assert memory["viewers_bytes"] > 0


def test_targets_are_reported_only_at_the_target_viewer_count(
    smoke: tuple[str, dict[str, Any]],
) -> None:
    output, _ = smoke
    assert "target @" not in output  # the smoke has no 1,000-viewer row
    assert "where the CPU goes" in output


# --- the benchmark's own arithmetic, imported directly ------------------------------------


def load_benchmark() -> ModuleType:
    """bench/ is scripts, not a package: load fanout.py by path."""
    spec = importlib.util.spec_from_file_location("fanout_bench", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fanout_bench = load_benchmark()


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))  # 1..100
    assert fanout_bench.percentile(values, 0.50) == 50
    assert fanout_bench.percentile(values, 0.99) == 99
    assert fanout_bench.percentile([7], 0.99) == 7
    assert fanout_bench.percentile([1, 2], 0.5) == 1


def test_plan_sends_enough_pushes_for_a_percentile_and_enough_datagrams() -> None:
    plan = fanout_bench.FULL_PLAN
    assert plan.viewer_counts == (1, 100, 1000, 5000)
    assert plan.profiles == ("GCM", "CM")
    for viewers in plan.viewer_counts:
        assert plan.pushes(viewers) >= plan.min_pushes
        assert plan.pushes(viewers) * viewers >= plan.datagrams
        assert plan.baseline_pushes(viewers) * viewers >= plan.baseline_datagrams


def test_rates_are_per_delivered_datagram() -> None:
    lossy = fanout_bench.Throughput(
        sent=1000, delivered=900, cpu_seconds=0.01, system_seconds=0.006, wall_seconds=0.02
    )
    assert lossy.per_cpu_second == pytest.approx(90_000)
    assert lossy.per_wall_second == pytest.approx(45_000)
    assert lossy.delivered_fraction == pytest.approx(0.9)
    assert lossy.kernel_ns_per_datagram == pytest.approx(6e6 / 900)
    assert lossy.user_ns_per_datagram == pytest.approx(4e6 / 900)
    nothing = fanout_bench.Throughput()
    assert nothing.per_cpu_second == nothing.delivered_fraction == 0.0
