"""How long datagrams wait in a worker's socket: the sign that a worker is past its
capacity (a saturated worker queues instead of dropping, so loss counters stay at zero,
and its event loop's timers still run on time, while viewers fall behind)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import aiohttp
import pytest
from _server import LiveServer, live_server, settings_for
from _signalling import publish, view
from prometheus_client.parser import text_string_to_metric_families

from whepfan.config import MediaConfig
from whepfan.errors import ServiceUnavailable
from whepfan.media import health
from whepfan.media.health import ReceiveDelay, warn_when_behind
from whepfan.media.transport import MediaWorker
from whepfan.protocol.dtls import DtlsCertificate
from whepfan.workers.capacity import CapacityLedger, CapacityPolicy
from whepfan.workers.stats import WorkerStats


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_delay_is_the_worst_age_of_the_last_window() -> None:
    clock = Clock()
    delay = ReceiveDelay(clock=clock, window=1.0, bucket=0.25)
    assert delay.seconds() == 0.0
    delay.record(0.002)
    clock.now += 0.1
    delay.record(0.4)
    clock.now += 0.3
    delay.record(0.003)
    assert delay.seconds() == 0.4
    clock.now += 0.8  # the bucket holding 0.4 has left the 1 s window
    assert delay.seconds() == 0.003
    clock.now += 1.0
    assert delay.seconds() == 0.0  # nothing read lately: nothing waited
    assert delay.worst == 0.4
    delay.record(-0.001)  # clocks: a stamp a hair in the future is no wait
    assert delay.seconds() == 0.0
    with pytest.raises(ValueError):
        ReceiveDelay(window=0.1, bucket=0.25)


def test_sustained_needs_every_bucket_of_the_window_over_the_threshold() -> None:
    clock = Clock()
    delay = ReceiveDelay(clock=clock, window=1.0, bucket=0.25)
    for age in (0.2, 0.3, 0.15):
        delay.record(age)
        clock.now += 0.25
    assert delay.sustained(0.1) is None  # three buckets of four: not yet a second
    delay.record(0.5)
    assert delay.sustained(0.1) == 0.15
    clock.now += 0.25
    delay.record(0.01)  # one moment on time: no longer sustained
    assert delay.sustained(0.1) is None


def test_worker_stats_carry_the_delay_through_json() -> None:
    stats = WorkerStats(worker=1, pid=42, receive_delay=0.125)
    assert WorkerStats.from_json(stats.to_json()).receive_delay == 0.125
    legacy = stats.to_json()
    del legacy["receive_delay"]
    assert WorkerStats.from_json(legacy).receive_delay == 0.0
    with pytest.raises(ValueError):
        WorkerStats.from_json({**stats.to_json(), "receive_delay": "late"})


async def test_a_worker_measures_how_long_datagrams_waited_in_its_socket() -> None:
    config = MediaConfig(udp_host="127.0.0.1", udp_port=0, public_ips=("127.0.0.1",))
    worker = MediaWorker(config=config, certificate=DtlsCertificate.generate())
    await worker.start()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # The worker's loop is busy (blocked here) while datagrams arrive: they queue.
        for _ in range(5):
            sender.sendto(b"\x00garbage", ("127.0.0.1", worker.port))
        time.sleep(0.2)
        await asyncio.sleep(0.05)  # now it reads them
        assert 0.15 <= worker.receive_delay.seconds() < 5.0
        assert worker.router.counters  # they were read (and counted as unknown traffic)
    finally:
        sender.close()
        worker.close()


async def test_a_lasting_backlog_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(health, "RECEIVE_DELAY_WARNING", 0.05)
    loop = asyncio.get_running_loop()
    delay = ReceiveDelay(clock=loop.time, window=0.1, bucket=0.02)
    watcher = asyncio.ensure_future(warn_when_behind(delay, worker=3, interval=0.01))
    with caplog.at_level(logging.WARNING, logger="whepfan.health"):
        end = loop.time() + 0.4
        while loop.time() < end:
            delay.record(0.08)  # every read finds a datagram 80 ms old
            await asyncio.sleep(0.005)
    watcher.cancel()
    warnings = [r.getMessage() for r in caplog.records if "falling behind" in r.getMessage()]
    assert len(warnings) == 1  # at most once a minute
    assert "worker 3" in warnings[0] and "80 ms" in warnings[0]


@pytest.mark.parametrize("workers", [1, 2])
async def test_metrics_show_each_workers_receive_delay(workers: int) -> None:
    live = LiveServer(settings_for(workers=str(workers)))
    try:
        if workers > 1:
            await asyncio.sleep(1.6)  # worker processes report their stats once a second
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{live.url}/metrics") as response,
        ):
            text = await response.text()
        families = {family.name: family for family in text_string_to_metric_families(text)}
        samples = families["whepfan_worker_receive_delay_seconds"].samples
        assert sorted(sample.labels["worker"] for sample in samples) == [
            str(index) for index in range(workers)
        ]
        assert all(0.0 <= sample.value < 5.0 for sample in samples)
    finally:
        live.close()


# --- a worker that is behind takes no new viewers ------------------------------------------


def test_the_ledger_skips_a_worker_that_is_behind_and_refuses_when_all_are() -> None:
    ledger = CapacityLedger(policy=CapacityPolicy(), workers=2)
    ledger.set_behind(0, True)
    assert ledger.behind(0) and not ledger.behind(1)
    assert {ledger.reserve("s").worker for _ in range(3)} == {1}
    ledger.set_behind(1, True)
    with pytest.raises(ServiceUnavailable) as refused:
        ledger.reserve("s")
    assert refused.value.retry_after == ledger.policy.retry_after
    assert ledger.refusals["worker_behind"] == 1
    ledger.set_behind(0, False)  # caught up
    assert ledger.reserve("s").worker == 0
    ledger.remove_worker(1)
    assert not ledger.behind(1)


def test_worker_stats_carry_behind_through_json() -> None:
    stats = WorkerStats(worker=0, pid=1, receive_delay=0.3, behind=True)
    assert WorkerStats.from_json(stats.to_json()).behind is True
    with pytest.raises(ValueError):
        WorkerStats.from_json({**stats.to_json(), "behind": "yes"})


class _Backlogged:
    """Stands in for a worker's ReceiveDelay that has seen a lasting backlog."""

    def __init__(self, waited: float | None) -> None:
        self.waited = waited

    def sustained(self, threshold: float) -> float | None:
        return self.waited

    def seconds(self) -> float:
        return self.waited or 0.0


async def test_a_server_whose_worker_is_behind_answers_503_until_it_catches_up() -> None:
    live = live_server()
    try:
        assert live.info is not None
        backend = live.info.backend
        async with aiohttp.ClientSession(base_url=live.url) as http:
            publisher = await publish(http, "cam")
            backend.monitor.receive_delay = _Backlogged(0.4)
            await asyncio.sleep(1.5)  # the server's once-a-second tick sees it
            refused = await view(http, "cam")
            assert refused.status == 503 and "Retry-After" in refused.headers
            text = await (await http.get("/metrics")).text()
            assert 'whepfan_admission_refusals_total{reason="worker_behind"} 1.0' in text
            backend.monitor.receive_delay = _Backlogged(None)
            await asyncio.sleep(1.5)
            assert (await view(http, "cam")).status == 201
            await publisher.close()
    finally:
        live.close()
