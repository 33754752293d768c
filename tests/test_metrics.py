"""``GET /metrics``: Prometheus text that prometheus-client's own parser reads back, with
counters that move as sessions are admitted, refused, connected and fed media."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import orjson
import pytest
from _server import live_server
from _signalling import (
    AUTH,
    SDP,
    negotiate,
    placeholder_publisher,
    publish,
    publisher_offer,
    recvonly_peer,
    view,
)
from prometheus_client.parser import text_string_to_metric_families

from whepfan.http.metrics import ServerCollector
from whepfan.media.health import LatencyHistogram
from whepfan.workers.capacity import DEFAULT_VIEWER_COST, WorkerLoad
from whepfan.workers.stats import ServerStats, WorkerStats

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def render(stats: ServerStats) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(lambda: stats))
    return generate_latest(registry).decode()


def test_snapshot_renders_every_family() -> None:
    latency = LatencyHistogram()
    latency.observe(0.04)
    latency.observe(3.0)
    worker = WorkerStats(
        worker=1,
        pid=4242,
        viewers=7,
        publishers=1,
        router={"drop_unknown_address": 3, "nack_requested": 5, "keyframe_requests_sent": 2},
        fanout={"packets_sent": 1000, "bytes_sent": 1_200_000, "resent": 4, "send_errors": 1},
        setup_latency=latency,
    )
    load = WorkerLoad(
        worker=1, viewers=7, packets_per_second=700.0, bits_per_second=5e6, packet_budget=1400.0
    )
    stats = ServerStats(
        workers=[worker],
        loads=[load],
        egress_bit_budget=None,
        refusals={"worker_budget": 2},
        admissions={"top_layer": 7},
        worker_restarts=1,
    )
    samples = parse(render(stats))
    w = (("worker", "1"),)
    assert samples[("whepfan_viewers", w)] == 7
    assert samples[("whepfan_sent_packets_total", w)] == 1000
    assert samples[("whepfan_sent_bytes_total", w)] == 1_200_000
    assert samples[("whepfan_nacked_packets_total", w)] == 5
    assert samples[("whepfan_retransmissions_total", w)] == 4
    drops = (("reason", "unknown_address"), ("worker", "1"))
    assert samples[("whepfan_dropped_packets_total", drops)] == 3
    assert samples[("whepfan_dropped_packets_total", (("reason", "send_errors"), *w))] == 1
    assert samples[("whepfan_keyframe_requests_total", (("outcome", "sent"), *w))] == 2
    assert samples[("whepfan_worker_capacity_used_ratio", w)] == 0.5
    assert samples[("whepfan_egress_bit_budget", ())] == float("inf")
    assert samples[("whepfan_admission_refusals_total", (("reason", "worker_budget"),))] == 2
    assert samples[("whepfan_admissions_total", (("layer", "top"),))] == 7
    assert samples[("whepfan_worker_restarts_total", ())] == 1
    assert samples[("whepfan_session_setup_seconds_count", w)] == 2
    assert samples[("whepfan_session_setup_seconds_bucket", (("le", "0.05"), *w))] == 1
    assert samples[("whepfan_session_setup_seconds_bucket", (("le", "+Inf"), *w))] == 2


async def _scrape(http: aiohttp.ClientSession, headers: dict[str, str] | None = None) -> Samples:
    async with http.get("/metrics", headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(await response.text())


async def test_metrics_counters_move_with_admissions_refusals_and_media() -> None:
    # Room for exactly one viewer of the default cost.
    live = live_server(worker_packet_budget=str(DEFAULT_VIEWER_COST.packets_per_second))
    publisher = placeholder_publisher()
    viewer = recvonly_peer()
    try:
        async with aiohttp.ClientSession(base_url=live.url) as http:
            before = await _scrape(http)
            refusals = ("whepfan_admission_refusals_total", (("reason", "worker_budget"),))
            admitted = ("whepfan_admissions_total", (("layer", "top"),))
            assert before[refusals] == 0 and before[admitted] == 0
            await negotiate(http, publisher, "/whip/cam", AUTH)
            await negotiate(http, viewer, "/whep/cam")
            assert (await view(http, "cam")).status == 503
            after = await _scrape(http)
            assert after[refusals] == 1
            assert after[admitted] == 1
            assert after[("whepfan_viewers", (("worker", "0"),))] == 1
            # Media flows and sessions connect: the traffic counters and the setup
            # histogram (sampled once a second) move.
            sent = ("whepfan_sent_packets_total", (("worker", "0"),))
            setups = ("whepfan_session_setup_seconds_count", (("worker", "0"),))
            for _ in range(200):
                now = await _scrape(http)
                if now[sent] > 0 and now[setups] >= 2:
                    break
                await asyncio.sleep(0.05)
            assert now[sent] > before[sent]
            assert now[setups] >= 2  # the publisher and the viewer
            assert now[("whepfan_worker_load_packets_per_second", (("worker", "0"),))] > 0
    finally:
        await viewer.close()
        await publisher.close()
        live.close()


async def test_refused_publisher_while_draining_is_counted() -> None:
    live = live_server()
    try:
        async with aiohttp.ClientSession(base_url=live.url) as http:
            first = await publish(http, "cam")
            # A viewer keeps the draining server up (it exits once viewers are gone).
            assert (await view(http, "cam")).status == 201
            live.begin_drain()
            for _ in range(100):
                samples = await _scrape(http)
                if samples[("whepfan_draining", ())] == 1:
                    break
                await asyncio.sleep(0.02)
            second, offer = await publisher_offer()
            async with http.post("/whip/other", data=offer, headers={**AUTH, **SDP}) as response:
                assert response.status == 503
            samples = await _scrape(http)
            assert samples[("whepfan_admission_refusals_total", (("reason", "draining"),))] == 1
            await first.close()
            await second.close()
    finally:
        live.close()


# --- the metrics token (--metrics-token): RFC 6750 bearer auth on /metrics ---------------

METRICS_TOKEN = "scrape-secret"


async def _refused(http: aiohttp.ClientSession, headers: dict[str, str]) -> dict[str, object]:
    async with http.get("/metrics", headers=headers) as response:
        assert response.status == 401
        # RFC 9110 §11.6.1: a 401 carries a challenge; RFC 6750 §3 names the scheme.
        assert response.headers["WWW-Authenticate"].startswith("Bearer ")
        assert response.headers["Content-Type"].startswith("application/problem+json")
        problem: dict[str, object] = orjson.loads(await response.read())
    assert problem["status"] == 401 and problem["detail"]
    # Not a byte of the exposition leaks into the refusal.
    assert "whepfan_" not in str(problem)
    return problem


async def test_metrics_token_refuses_missing_and_wrong_tokens_and_admits_the_right_one() -> None:
    live = live_server(metrics_token=METRICS_TOKEN)
    try:
        async with aiohttp.ClientSession(base_url=live.url) as http:
            await _refused(http, {})
            wrong = await _refused(http, {"Authorization": "Bearer not-the-token"})
            async with http.get("/metrics", headers=AUTH) as response:
                assert response.status == 401  # the publish token is not the metrics token
            # A token that merely starts with the right one is as wrong as any other.
            prefix = await _refused(http, {"Authorization": f"Bearer {METRICS_TOKEN}x"})
            assert prefix["detail"] == wrong["detail"]
            # RFC 6750 §3.1: invalid_token only when credentials were presented.
            async with http.get("/metrics") as response:
                assert "error=" not in response.headers["WWW-Authenticate"]
            async with http.get("/metrics", headers={"Authorization": "Bearer wrong"}) as response:
                assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
            samples = await _scrape(http, {"Authorization": f"Bearer {METRICS_TOKEN}"})
            assert samples[("whepfan_workers", ())] == 1
            assert samples[("whepfan_viewers", (("worker", "0"),))] == 0
    finally:
        live.close()


async def test_metrics_stay_open_without_a_token_and_loopback_logs_no_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="whepfan.server")
    live = live_server()
    try:
        async with aiohttp.ClientSession(base_url=live.url) as http:
            samples = await _scrape(http)
            assert samples[("whepfan_workers", ())] == 1
            # A token the server never asked for is ignored, not refused.
            ignored = await _scrape(http, {"Authorization": "Bearer anything"})
            assert ignored[("whepfan_workers", ())] == 1
    finally:
        live.close()
    assert not [r for r in caplog.records if "/metrics" in r.getMessage()]


async def test_open_metrics_off_loopback_logs_one_warning_at_start_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="whepfan.server")
    live = live_server(http="0.0.0.0:0", allow_insecure_http=True)
    try:
        warnings = [r for r in caplog.records if "/metrics" in r.getMessage()]
        assert len(warnings) == 1
        assert "unauthenticated" in warnings[0].getMessage()
        assert "--metrics-token" in warnings[0].getMessage()
    finally:
        live.close()
    guarded = live_server(http="0.0.0.0:0", allow_insecure_http=True, metrics_token="t")
    try:
        assert len([r for r in caplog.records if "/metrics" in r.getMessage()]) == 1
    finally:
        guarded.close()
