"""A worker's event-loop lag: the sign that it is past its capacity (a saturated worker
queues instead of dropping, so loss counters stay at zero while viewers fall behind)."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest
from _server import LiveServer, settings_for
from prometheus_client.parser import text_string_to_metric_families

from whepfan import capacity
from whepfan.capacity import LoopLag, WorkerStats, watch_loop


def test_lag_is_the_worst_of_the_recent_window() -> None:
    lag = LoopLag(window=3)
    assert lag.seconds == 0.0 and lag.behind(0.0) is None
    for lateness in (0.01, 0.5, 0.02):
        lag.record(lateness)
    assert lag.seconds == 0.5
    lag.record(0.03)
    lag.record(0.04)  # 0.5 has left the window of three
    assert lag.seconds == 0.04
    assert lag.worst == 0.5
    lag.record(-0.001)  # a timer that fired early is not negative lag
    assert lag.seconds == 0.04 and min(lag._recent) == 0.0
    with pytest.raises(ValueError):
        LoopLag(window=0)


def test_behind_needs_a_whole_window_over_the_threshold() -> None:
    lag = LoopLag(window=3)
    lag.record(0.2)
    lag.record(0.3)
    assert lag.behind(0.1) is None  # two checks: not yet sustained
    lag.record(0.15)
    assert lag.behind(0.1) == 0.15
    lag.record(0.05)  # one check on time: not behind any more
    assert lag.behind(0.1) is None


def test_worker_stats_carry_the_lag_through_json() -> None:
    stats = WorkerStats(worker=1, pid=42, loop_lag=0.125)
    assert WorkerStats.from_json(stats.to_json()).loop_lag == 0.125
    legacy = stats.to_json()
    del legacy["loop_lag"]
    assert WorkerStats.from_json(legacy).loop_lag == 0.0
    with pytest.raises(ValueError):
        WorkerStats.from_json({**stats.to_json(), "loop_lag": "late"})


async def test_a_blocked_loop_shows_as_lag_and_a_sustained_one_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(capacity, "LOOP_LAG_WARNING", 0.001)
    lag = LoopLag(window=4)
    watcher = asyncio.ensure_future(watch_loop(lag, worker=3, interval=0.005))
    busy = True

    def hog() -> None:
        # Work that keeps the loop from running its timers on time (a saturated worker).
        time.sleep(0.01)
        if busy:
            asyncio.get_running_loop().call_soon(hog)

    with caplog.at_level(logging.WARNING, logger="whepfan.capacity"):
        asyncio.get_running_loop().call_soon(hog)
        await asyncio.sleep(0.3)
        busy = False
        await asyncio.sleep(0.05)
    watcher.cancel()
    assert lag.worst >= 0.005
    warnings = [r.getMessage() for r in caplog.records if "falling behind" in r.getMessage()]
    assert len(warnings) == 1  # at most once a minute
    assert "worker 3" in warnings[0]


@pytest.mark.parametrize("workers", [1, 2])
async def test_metrics_show_each_workers_loop_lag(workers: int) -> None:
    live = LiveServer(settings_for(workers=str(workers)))
    try:
        # A couple of checks, and (worker processes) a stats report to the main process.
        await asyncio.sleep(0.6 if workers == 1 else 1.6)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{live.url}/metrics") as response,
        ):
            text = await response.text()
        families = {family.name: family for family in text_string_to_metric_families(text)}
        samples = families["whepfan_worker_loop_lag_seconds"].samples
        assert sorted(sample.labels["worker"] for sample in samples) == [
            str(index) for index in range(workers)
        ]
        assert all(0.0 <= sample.value < 5.0 for sample in samples)
    finally:
        live.close()
